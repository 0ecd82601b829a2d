"""Export an encoder (an export folder of tools/export_encoder.py) to ONNX for chosen domains and one image size.

Usage (``pip install '.[onnx]'``: onnx, onnxruntime, onnxscript)::

    python tools/export_onnx.py output/demo/export output/demo/encoder.onnx --domains s2_rgb,s1 --image-size 64 \\
        --check output/demo/data/terramesh64

The graph (``torch.onnx.export``, the dynamo exporter) takes one input per chosen domain, named by the domain:
float32 (B, C, S, S) normalised as the export's config.json says, or int64 (B, S, S) class ids (-1 = no-data) for
class maps; with ``--valid-masks`` also bool (B, S, S) ``valid_<domain>``; an encoder with metadata tokens
(``architecture.metadata``) also takes float32 (B, 2) ``metadata_<field>``, the (sin, cos) pair of each field
(NaN: the learned missing embedding). Its output ``tokens`` is (B, N + G, D), the global tokens last
(``MultiModalEncoder.encode``). Mixture-of-experts encoders (``model.ffn`` ``moe``) are refused: their routing
(a data-dependent number of tokens per expert) does not trace to a graph with a free batch size. The batch size B is free; the image size S is fixed (the
position embeddings are built for its token grid). The export's config.json, trimmed to the chosen domains and
the image size, is stored in the model's metadata (``metadata_props["multimae_eo_config"]``).

After the export the graph is run with onnxruntime and compared with PyTorch on random inputs and, with
``--check DATA_PATH``, on every tile of a split of an MMEarth file set (real tiles); a difference above
``--atol`` is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimae.domains import DOMAINS  # noqa: E402
from multimae.encoder import MultiModalEncoder  # noqa: E402
from multimae.pretrained import load_pretrained, read_pretrained_config  # noqa: E402
from utils.config import user_errors  # noqa: E402

__all__ = ["EncodeGraph", "export_onnx", "onnx_max_difference", "real_inputs", "main"]

#: Default opset of the dynamo exporter in torch 2.9+.
OPSET = 18


class EncodeGraph(nn.Module):
    """``encoder.encode`` with positional tensors (ONNX graphs have a flat list of inputs).

    Args:
        encoder: The encoder.
        valid_masks: Take a bool (B, H, W) validity mask per domain after the domain tensors.
    """

    def __init__(self, encoder: MultiModalEncoder, valid_masks: bool = False) -> None:
        super().__init__()
        self.encoder, self.valid_masks = encoder, valid_masks

    @property
    def input_names(self) -> list[str]:
        """The graph's input names: the domains, ``valid_<domain>`` with ``valid_masks``, then
        ``metadata_<field>`` for each of the encoder's metadata fields."""
        names = list(self.encoder.in_domains)
        return (names + ([f"valid_{d}" for d in names] if self.valid_masks else [])
                + [f"metadata_{f}" for f in self.encoder.metadata_fields])

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """(domain tensors..., [valid masks...], [metadata pairs (B, 2)...]) -> (B, N + G, D) tokens."""
        domains, fields = self.encoder.in_domains, self.encoder.metadata_fields
        n = len(domains)
        inputs = dict(zip(domains, xs[:n]))
        valid = dict(zip(domains, xs[n:2 * n])) if self.valid_masks else None
        metadata = dict(zip(fields, xs[len(xs) - len(fields):])) if fields else None
        return self.encoder.encode(inputs, valid=valid, metadata=metadata)


def _example(encoder: MultiModalEncoder, batch: int, size: int, valid_masks: bool, seed: int = 0) -> tuple:
    """Random inputs of the graph: standard normal, class ids 0..K-1, validity with a few invalid pixels,
    (sin, cos) pairs of random angles (the first sample's first field NaN: absent)."""
    g = torch.Generator().manual_seed(seed)
    xs, masks = [], []
    for d in encoder.in_domains:
        dom = DOMAINS[d]
        if dom.kind == "categorical":
            xs.append(torch.randint(0, dom.num_classes, (batch, size, size), generator=g))
        else:
            xs.append(torch.randn(batch, dom.num_channels, size, size, generator=g))
        masks.append(torch.rand(batch, size, size, generator=g) > 0.1)
    pairs = []
    for i, _ in enumerate(encoder.metadata_fields):
        angle = torch.rand(batch, generator=g) * 2 * torch.pi
        pair = torch.stack([angle.sin(), angle.cos()], dim=1)
        if i == 0:
            pair[0] = float("nan")
        pairs.append(pair)
    return tuple(xs + (masks if valid_masks else []) + pairs)


def export_onnx(export_dir: str | Path, out: str | Path, *, domains: list[str] | None = None, image_size: int | None = None,
                valid_masks: bool = False, opset: int = OPSET) -> tuple[Path, EncodeGraph]:
    """Write the ONNX graph of an export folder's encoder.

    Args:
        export_dir: The export folder (config.json, model.safetensors).
        out: The ``.onnx`` file to write (weights inside it, no external data file).
        domains: Input domains, a subset of the exported ones (default: all).
        image_size: Image side S in pixels (default: the architecture's input size).
        valid_masks: Add the ``valid_<domain>`` inputs.
        opset: ONNX opset.

    Returns:
        (the file written, the PyTorch module it was exported from).

    Raises:
        FileNotFoundError, ValueError: a bad export folder or domain (:func:`multimae.load_pretrained`), an image
            size the patch sizes do not divide, or a feed-forward kind other than ``mlp`` (``model.ffn``: the
            mixture-of-experts routing does not trace to a graph with a free batch size).
    """
    import onnx  # the onnx extra

    config = read_pretrained_config(export_dir)
    arch = config["architecture"]
    if arch["ffn"] != "mlp":
        raise ValueError(f"{Path(export_dir) / 'config.json'}: architecture.ffn (model.ffn) is {arch['ffn']!r}; its "
                         "routing sends a data-dependent number of tokens to each expert, which does not export to an "
                         "ONNX graph with a free batch size (only model.ffn 'mlp' exports)")
    if image_size is not None:
        for d in domains or arch["in_domains"]:
            p = arch["patch_sizes"].get(d, arch["patch_size"])
            if image_size % p:
                raise ValueError(f"--image-size {image_size} is not divisible by the patch size {p} of domain {d!r}")
    encoder = load_pretrained(export_dir, in_domains=domains, input_size=image_size)
    size = encoder.input_size
    graph = EncodeGraph(encoder, valid_masks).eval()
    example = _example(encoder, 2, size, valid_masks)
    batch = torch.export.Dim("batch", min=1)
    dynamic = (tuple({0: batch} for _ in example),)  # one entry for the *xs parameter: every input's dim 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Every input shares the batch dimension: the exporter says it keeps one of the (identical) axis names.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        torch.onnx.export(graph, example, str(out), input_names=graph.input_names, output_names=["tokens"],
                          opset_version=opset, dynamo=True, external_data=False, dynamic_shapes=dynamic, verbose=False)
    config["architecture"] = encoder.spec
    config["token_layout"] = encoder.layout().to_dict()
    config["domains"] = {d: config["domains"][d] for d in encoder.in_domains}
    config["onnx"] = {"inputs": graph.input_names, "output": "tokens", "image_size": size, "opset": opset}
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = "multimae_eo_config", json.dumps(config)
    onnx.save(model, str(out))
    return out, graph


def onnx_max_difference(path: str | Path, graph: EncodeGraph, xs: tuple) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's ``tokens`` for the inputs ``xs``."""
    import onnxruntime as ort  # the onnx extra

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {name: x.numpy() for name, x in zip(graph.input_names, xs)})
    with torch.no_grad():
        want = graph(*xs).numpy()
    if got.shape != want.shape:
        raise ValueError(f"{path}: onnxruntime gives tokens of shape {got.shape}, PyTorch {want.shape}")
    return float(abs(got - want).max())


def real_inputs(data_path: str | Path, graph: EncodeGraph, export_dir: str | Path, split: str = "val") -> tuple:
    """Every tile of ``split`` of an MMEarth file set as the graph's inputs (the batch contract: normalised with
    the file set's own statistics, elevation as the export's config.json says; no-data filled; the metadata
    pairs the file set holds, NaN where it has none).

    Raises:
        FileNotFoundError, KeyError, ValueError: the file set or split is missing (see MMEarthDataset).
    """
    from torch.utils.data import default_collate

    from utils.data.mmearth import MMEarthDataset

    domains, fields = graph.encoder.in_domains, graph.encoder.metadata_fields
    elevation = read_pretrained_config(export_dir)["domains"]["elevation"]["normalization"] \
        if "elevation" in domains else "per_tile"
    ds = MMEarthDataset(data_path, domains, split, input_size=graph.encoder.input_size, elevation_norm=elevation,
                        metadata=fields)
    if len(ds) == 0:
        raise ValueError(f"{data_path}: split {split!r} holds no tiles")
    batch = default_collate([ds[i] for i in range(len(ds))])
    xs = [batch["inputs"][d] for d in domains]
    return tuple(xs + ([batch["valid"][d] for d in domains] if graph.valid_masks else [])
                 + [batch["metadata"][f] for f in fields])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", help="export folder of tools/export_encoder.py")
    parser.add_argument("out", help="ONNX file to write")
    parser.add_argument("--domains", help="comma-separated input domains (default: every exported domain)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the architecture's)")
    parser.add_argument("--valid-masks", action="store_true", help="add bool valid_<domain> inputs")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--check", metavar="DATA_PATH", help="MMEarth file set: compare on its real tiles too")
    parser.add_argument("--split", default="val", help="split of --check (default: val)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnxruntime - PyTorch|")
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        print(f"error: {err.name} is not installed: pip install '.[onnx]' (onnx, onnxruntime, onnxscript)",
              file=sys.stderr)
        return 2
    with user_errors():
        domains = [d.strip() for d in args.domains.split(",")] if args.domains else None
        out, graph = export_onnx(args.export_dir, args.out, domains=domains, image_size=args.image_size,
                                 valid_masks=args.valid_masks, opset=args.opset)
        size = graph.encoder.input_size
        checks = [("random inputs", _example(graph.encoder, 3, size, args.valid_masks, seed=1))]
        if args.check:
            checks.append((f"{args.check} {args.split} tiles", real_inputs(args.check, graph, args.export_dir,
                                                                         args.split)))
        print(f"wrote {out} (inputs {', '.join(graph.input_names)}; {size} x {size} px; output tokens)")
        for label, xs in checks:
            diff = onnx_max_difference(out, graph, xs)
            print(f"onnxruntime vs PyTorch on {xs[0].shape[0]} {label}: max |difference| {diff:.3g}")
            if not diff <= args.atol:
                raise ValueError(f"{out}: onnxruntime differs from PyTorch by {diff:.3g} > --atol {args.atol:g} "
                                 f"on {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
