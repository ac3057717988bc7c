"""Checkpoints that survive a crash mid-write, and the ``ckpt_path`` a run resumes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from diagvi.io import atomic_write

# what `ckpt_path=last` and `ckpt_path=<run dir>` point to inside a run directory
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or is not a Lightning checkpoint."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` that writes atomically.

    A checkpoint is written to a temporary file in the target's folder and moved into place
    with ``os.replace``, so a run killed while saving keeps the previous ``last.ckpt``.
    Loading names the file in its error when it is unreadable or not a Lightning checkpoint.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # storage_options passed on: TorchCheckpointIO refuses them rather than ignore them
        atomic_write(
            target,
            lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(
                checkpoint, tmp, storage_options
            ),
        )

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            checkpoint = super().load_checkpoint(path, *args, **kwargs)
        except Exception as err:
            raise CheckpointError(
                f"cannot read checkpoint {path}: {type(err).__name__}: {str(err)[:300]} "
                "(a truncated or foreign file; resume from another checkpoint or start afresh)"
            ) from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(
                f"{path} is not a Lightning checkpoint (no 'state_dict'); resume from a "
                "checkpoint written by diagvi.train (e.g. <run dir>/checkpoints/last.ckpt)"
            )
        return checkpoint


def resolve_ckpt_path(value: str | Path | None, run_dir: Path) -> str | None:
    """The checkpoint file a run resumes from.

    ``None``: none. ``last``: ``<run_dir>/checkpoints/last.ckpt``. A directory: that run
    directory's ``checkpoints/last.ckpt``. Else a checkpoint file (``~`` expanded). Raises
    ``FileNotFoundError`` naming the path looked for when it does not exist, ``ValueError``
    for an empty string.
    """
    if value is None:
        return None
    if not str(value).strip():
        # Path("") is the working directory: `ckpt_path=` would resume whatever run's
        # checkpoints/ happen to lie there
        raise ValueError("ckpt_path is empty; omit it (null) to start afresh, or name a file")
    # `~` in a config file or a quoted override reaches us unexpanded (only a shell expands it)
    given = Path(value).expanduser()
    if str(value) == "last":
        path = run_dir / LAST_CHECKPOINT
        hint = "ckpt_path=last looks in this run's directory (set hydra.run.dir to the old run)"
    elif given.is_dir():
        path = given / LAST_CHECKPOINT
        hint = f"ckpt_path={value} is a directory: its run's last checkpoint is used"
    else:
        path = given
        hint = "ckpt_path names a checkpoint file, a run directory, or `last`"
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; {hint}. last.ckpt is written by the model_checkpoint "
            "callback (callbacks=default)"
        )
    return str(path)
