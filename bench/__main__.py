"""`python -m bench`: run a scenario against a server and store the results (see --help)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench import baseline
from bench.compose import compose, compose_sweep
from bench.config import ConfigError, from_hydra
from bench.resume import recorded_config
from bench.runner import WarmupError, run
from bench.stop_signals import Interrupted
from bench.store import ResultsDirError
from bench.summary import print_summary
from bench.targets import TargetError

# Exit codes: 0 complete; 1 partial (the server died or the run was interrupted; what finished
# is on disk); 2 nothing was measured (bad config, unreachable server, all warm-up failed, a
# results directory that cannot take the files).
EXIT_PARTIAL, EXIT_UNUSABLE = 1, 2


@hydra.main(version_base="1.3", config_path="../scenarios", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.resume is not None:  # the run's own configuration, not the defaults
            cfg = recorded_config(Path(cfg.resume), HydraConfig.get().overrides.task)
        bench_cfg = from_hydra(cfg)
        result = run(bench_cfg)
    except (ConfigError, TargetError, WarmupError, Interrupted, ResultsDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNUSABLE)
    print_summary(result.runs, result.requests)
    if result.capacity is not None:
        print(result.capacity.text())
        for note in result.capacity.notes:
            print(f"  note: {note}")
    print(f"results: {result.run_dir}")
    if bench_cfg.baseline_save and result.status == "complete":
        home = baseline.save(
            result.run_dir,
            bench_cfg.baseline_save,
            Path(bench_cfg.baselines_dir),
            keep=bench_cfg.baseline_keep,
        )
        sessions = len(baseline.sessions(home)[bench_cfg.scenario.name])
        kept = f"{sessions} session{'s' * (sessions != 1)} kept"
        print(f"baseline: {home} ({bench_cfg.scenario.name} saved, {kept})")
    if result.status != "complete":
        if bench_cfg.baseline_save:
            print("error: a partial run is not saved as a baseline", file=sys.stderr)
        print(
            f"error: run is partial: {result.reason}. Every finished request is in "
            f"{result.run_dir}.",
            file=sys.stderr,
        )
        sys.exit(EXIT_PARTIAL)


def check_command_line(argv: list[str]) -> None:
    """Compose every config the command line asks for (each job of a multirun) and raise
    ConfigError naming the first bad key or value. Hydra reports its own composition errors
    with exit code 1 and advice that can mislead (`+key=...` adds a misspelt key), so this runs
    first, on the flags hydra.main parses, and leaves running to it."""
    args = get_args_parser().parse_args(argv)  # the parser hydra.main itself uses
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return  # Hydra prints its own pages
    if args.config_path or args.config_name or args.config_dir or args.experimental_rerun:
        return  # a config other than scenarios/config.yaml: Hydra checks it
    if args.multirun:
        compose_sweep(args.overrides)
    else:
        compose(*args.overrides)


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNUSABLE)
    main()
