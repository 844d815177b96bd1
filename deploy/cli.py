"""``rtagger export``: a thin command; the work is in :mod:`rtagger.deploy.export` (lazy)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from rtagger.errors import RtaggerError


class ExportFormat(str, Enum):
    onnx = "onnx"
    exported_program = "exported-program"
    tensorrt = "tensorrt"


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""

    @app.command("export")
    def export_command(
        model: str = typer.Argument(..., help="Checkpoint path, 'default', or "
                                    "'untrained:SIZE'."),
        fmt: ExportFormat = typer.Option(..., "--format", "-f", help="Artefact to write."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write (created)."),
        device: str = typer.Option(None, "--device", help="TensorRT: the GPU to compile "
                                   "for (default cuda). Others export on the CPU."),
        max_batch: int = typer.Option(64, "--max-batch", min=1, help="TensorRT: largest "
                                      "batch the engine accepts."),
        force: bool = typer.Option(False, "--force", help="Replace an existing export."),
    ) -> None:
        """Export a model to a folder (ONNX, ExportedProgram or TensorRT) for serving."""
        from rich.console import Console

        from rtagger.deploy.export import export_model
        from rtagger.engines.exported import read_manifest

        err = Console(stderr=True, soft_wrap=True)
        try:
            path = export_model(model, fmt.value, out, device=device, max_batch=max_batch,
                                overwrite=force)
            manifest = read_manifest(path)
        except RtaggerError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2) from None
        parity = manifest["parity"]
        err.print(f"wrote {path} ({fmt.value}: {manifest['file']}); max |probs - eager "
                  f"torch| = {parity['max_abs_diff_probs']:.1e}", highlight=False)
