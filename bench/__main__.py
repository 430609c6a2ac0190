"""`python -m bench`: run a scenario against a server and store the results (see --help)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from bench.config import ConfigError, from_hydra
from bench.runner import WarmupError, run
from bench.summary import print_summary
from bench.targets import TargetError

log = logging.getLogger("bench")

# Exit codes: 0 complete; 1 partial (the server died or the run was interrupted; what finished
# is on disk); 2 nothing was measured (bad config, unreachable server, all warm-up failed).
EXIT_PARTIAL, EXIT_UNUSABLE = 1, 2


@hydra.main(version_base="1.3", config_path="../scenarios", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        bench_cfg = from_hydra(cfg)
        result = run(bench_cfg)
    except (ConfigError, TargetError, WarmupError) as exc:
        log.error("%s", exc)
        sys.exit(EXIT_UNUSABLE)
    print_summary(result.runs, result.requests, bench_cfg.slo)
    print(f"results: {result.run_dir}")
    if result.status != "complete":
        log.error(
            "run is partial: %s. Every finished request is in %s.", result.reason, result.run_dir
        )
        sys.exit(EXIT_PARTIAL)


if __name__ == "__main__":
    main()
