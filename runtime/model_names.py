"""What `--model` may name: `tiny`, a named architecture (runtime/architectures/*.json, shapes
without weights) or a Hugging Face checkpoint directory. Free of torch, so the harness checks a
bundled target's model before it starts anything."""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"


def named_architecture(name: str) -> Path | None:
    """The config.json of a named architecture under runtime/architectures/, if one exists."""
    path = ARCHITECTURES_DIR / f"{name}.json"
    return path if path.is_file() else None


def named_architectures() -> list[str]:
    """The named architectures other than tiny (which builds its own weights): each needs
    dummy weights."""
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json") if p.stem != "tiny")


def check_model(
    model: str,
    load_format: str | None,
    model_key: str = "--model",
    dummy: str = "--load-format dummy",
) -> None:
    """Raises ValueError unless the engine can load `model`; nothing is built or read. The
    message names the setting as the caller's user writes it (`model_key`, `dummy`)."""
    if model == "tiny":
        return
    if named_architecture(model) is not None:
        if load_format != "dummy":
            raise ValueError(
                f"{model_key} {model!r} is a named architecture, shapes without weights: add "
                f"{dummy} (seeded random weights), or pass a checkpoint directory"
            )
    elif not (Path(model) / "config.json").is_file():
        raise ValueError(
            f"{model_key} {model!r} is neither `tiny`, a named architecture "
            f"({', '.join(named_architectures())}; with {dummy}), nor a directory with a "
            "config.json (a Hugging Face checkpoint)"
        )
