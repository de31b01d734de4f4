"""Bounded discovery: the time and peak memory of ``find_channel_groups(..., heads=True)`` on Llama layouts of growing
size (real weights, checked by numbers on a copy), split into tracing with the group expansion and the numeric check,
and on the 32-layer Llama-7B layout built on the meta device and checked on one real bf16 layer (``check_model``).
Each model runs in a fresh process, so its peak resident memory is its own."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from benchmarks.report import Section, Suite, table

SIZES: dict[str, list[tuple[int, int]]] = {  # (hidden, layers) of the real models
    "quick": [(256, 2), (256, 8)],
    "full": [(256, 2), (256, 8), (256, 32), (512, 8), (1024, 2), (1024, 8)],
}

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch, transformers
    from lightning_prune.structure import discovery, find_channel_groups
    torch.set_num_threads(1)
    hidden, layers = int(sys.argv[1]), int(sys.argv[2])
    seconds = {"trace_and_expand": 0.0, "numeric_check": 0.0}
    def timed(name, key):
        function = getattr(discovery, name)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - start
        setattr(discovery, name, wrapper)
    timed("_candidates", "trace_and_expand")
    timed("_checked_by_numbers", "numeric_check")
    def config(width, layers, vocab):  # Llama-7B's proportions: intermediate 11008/4096 of the width, head_dim 128
        heads = max(4, width // 128)
        return transformers.LlamaConfig(hidden_size=width, intermediate_size=round(width * 11008 / 4096 / 8) * 8,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab)
    torch.manual_seed(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if hidden == 4096:  # the 7B layout on meta, checked on one real bf16 layer
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config(4096, 32, 32000)).eval()
        check = transformers.LlamaForCausalLM(config(4096, 1, 256)).to(torch.bfloat16).eval()
    else:
        model, check = transformers.LlamaForCausalLM(config(hidden, layers, 1000)).eval(), None
    start = time.perf_counter()
    groups = find_channel_groups(model, torch.randint(0, 256, (1, 8)), heads=True, check_model=check)
    total = time.perf_counter() - start
    print(json.dumps({"parameters_M": sum(p.numel() for p in model.parameters()) / 1e6, "groups": len(groups),
        "seconds": total, **seconds, "rss_before_MB": before / 1024,
        "rss_peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


_ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(hidden: int, layers: int) -> dict[str, float]:
    """One discovery in a fresh process (hidden 4096: the 7B layout on meta with a one-layer ``check_model``), the
    torchvision shim first on its path as in the tests."""
    path = os.pathsep.join(filter(None, [str(_ROOT / "tests" / "torchvision_shim"), str(_ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(hidden), str(layers)], capture_output=True, text=True, check=True, cwd=_ROOT,
        env={**os.environ, "PYTHONPATH": path},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(suite: Suite, out_dir: pathlib.Path) -> Section:
    configs = [*SIZES[suite], (4096, 32)]
    results = {f"{hidden}x{layers}": measure(hidden, layers) for hidden, layers in configs}
    rows = [
        [("7B layout on meta, checked on 1 real bf16 layer" if key == "4096x32" else f"hidden {key.replace('x', ', ')} layers"),
         f"{r['parameters_M']:,.1f}", r["groups"], f"{r['seconds']:.2f}", f"{r['trace_and_expand']:.2f}", f"{r['numeric_check']:.2f}",
         f"{r['rss_peak_MB'] - r['rss_before_MB']:,.0f}"]
        for key, r in results.items()
    ]
    markdown = "\n".join([
        "`find_channel_groups(model, tokens, heads=True)` on `LlamaForCausalLM` built from a config with Llama-7B's "
        "proportions (intermediate 11008/4096 of the hidden width, head_dim 128, a quarter as many key/value heads; "
        "vocabulary 1000), random weights, 8 tokens, 1 torch thread, one fresh process per model. *Trace and expand*: "
        "Torch-Pruning's dependency graph and the group expansion; *numeric check*: removing half of every group's "
        "channels from a copy must compute what masking them computes (on the 7B row: on `check_model`). Memory: the "
        "process's peak resident set minus what it held after its imports (the model, the copy and the check included).",
        "",
        table(["model", "parameters (M)", "groups", "discovery s", "trace and expand s", "numeric check s", "peak memory added MB"], rows),
    ])
    notes = [
        "The 7B row's model (8 key/value heads: 5.9 B parameters, 24 GB in fp32) is on the meta device and never "
        "materialised; the memory added is the one real layer (0.4 GB in bf16), its copy and its check. Most of its "
        "trace-and-expand time is Torch-Pruning expanding the residual stream from every o_proj/down_proj root until "
        "MAX_GROUP_ITEMS stops it (the stream is no group without hidden=True, and with it passes that bound too).",
    ]
    return Section("Bounded discovery: Llama layouts up to 7B", markdown, [], {"configs": configs, "results": results}, notes, [])
