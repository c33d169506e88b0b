"""An evaluation report as the SGA paper's tables: Table 1 (generation) or Table 2 (reconstruction)
in the paper's column order, one row, with the protocol written under it."""

from __future__ import annotations

from typing import Any

from sga_jax.models import inception

TABLE1 = (("gFID", "gfid"), ("CLIP Score", "clip_score"), ("Aesthetics", "aesthetics"),
          ("GLCM Score", "glcm_score"), ("Compression Ratio", "compression_ratio"))
TABLE2 = (("rFID", "rfid"), ("NMSE", "nmse"), ("PSNR", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"))
MISSING = "-"

PROTOCOL_TEXT = {
    "diffusion-4k": "8-bit values, TF1 bilinear resize to 299 (torch-fidelity / torchmetrics <= 1.7), (x - 128) / 128",
    "pytorch-fid": "[0, 1] values, PyTorch bilinear resize to 299 (align_corners=False, no antialias), 2x - 1",
}


def _cell(value: Any) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def markdown(report: dict[str, Any], model: str, dataset: str) -> str:
    """The report's row of Table 1 or Table 2 (`report["table"]`) and its protocol, as Markdown.

    `model` names the row (the paper's Model column); `dataset` fills Table 1's Evaluation
    Dataset column (Table 2 has Resolution there). Metrics the run did not compute show "-".
    """
    columns = TABLE1 if report["table"] == 1 else TABLE2
    second = ("Evaluation Dataset", dataset) if report["table"] == 1 else ("Resolution", report["resolution"])
    header = ["Model", second[0], *(title for title, _ in columns)]
    row = [model, second[1], *(_cell(report.get(key)) for _, key in columns)]
    lines = [f"Table {report['table']} ({'generation' if report['table'] == 1 else 'reconstruction'}):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", ""]
    lines.append(f"Protocol: {_images_line(report)}.")
    if "fid_protocol" in report:
        fid = "rFID" if report["table"] == 2 else "gFID"
        lines.append(f"{fid}: FID InceptionV3 pool features ({inception.FEATURES}-d), protocol "
                     f"{report['fid_protocol']}: {PROTOCOL_TEXT[report['fid_protocol']]}; statistics in float64.")
    if report["table"] == 2:
        lines.append("NMSE, PSNR (dB) and SSIM on 8-bit RGB; means over image pairs." + (
            " LPIPS: VGG16 trunk with the LPIPS v0.1 lin layers, on [-1, 1] images." if "lpips" in report else ""))
    missing = [title for title, key in columns if key not in report]
    if missing:
        lines.append(f"Not computed: {', '.join(missing)} (see python -m sga_jax.evaluate --help).")
    return "\n".join(lines) + "\n"


def _images_line(report: dict[str, Any]) -> str:
    parts = [f"{report['images']} images at {report['resolution']}"]
    if report.get("size") is not None:
        parts.append(f"each first resized (short side, bilinear, antialiased) and center-cropped to "
                     f"{report['size']}x{report['size']} as Diffusion-4K's evaluation does")
    if "pairs" in report:
        parts.append(f"{report['pairs']} reconstruction / original pairs")
    if "reference_images" in report:
        parts.append(f"against {report['reference_images']} reference images")
    return "; ".join(parts)
