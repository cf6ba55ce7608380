"""bench.py: every benchmark runs at a tiny size on CPU and prints well-formed rows, and the FLOP count that MFU
rests on agrees with torch's FLOP counter and with a hand count of the masks."""
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from tokenizer import TokenizerConfig, VideoFlexTok
from transformer import Layout

FAST = ["--warmup", "0", "--runs", "1"]
TINY = {
    "tok-step": ["--presets", "d18-d18", "--batch-size", "1"],
    "compile": ["--backend", "eager", "--batch-size", "1"],
    "attention": ["--presets", "d18-d18", "--batch-size", "1"],
    "decode": ["--budgets", "256", "--steps", "2"],
    "stream": ["--latent-frames", "2"],
    "vae": ["--frames", "5"],
    "vae-memory": ["--frames", "5"],
    "ar": ["--batch-sizes", "2", "--lengths", "5", "330"],
    "epochs": ["--videos", "4", "--batch-size", "2", "--epochs", "1", "--workers", "0"],
    "data": ["--videos", "2", "--seconds", "2", "--frames", "5", "--clips", "2", "--batch-size", "1", "--workers", "0",
             "--size", "32", "--source-size", "32"],
}
MEDIAN = re.compile(r"(\S+) \(N=(\d+)\)")


def rows(text):
    """The table rows of a benchmark's output (header and separator excluded), as lists of 6 cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == bench.HEADER.splitlines()[0] and set(lines[1]) <= {"|", "-"}
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_every_benchmark_has_a_tiny_test():
    assert set(TINY) == set(bench.BENCHMARKS)


@pytest.mark.parametrize("name", TINY)
def test_benchmark_prints_well_formed_rows(name, capsys):
    bench.main([name, "--device", "cpu", *FAST, *TINY[name]])
    table = rows(capsys.readouterr().out)
    assert table
    for what, config, device, dtype, median, derived in table:
        assert what and config and device.startswith("cpu") and dtype in ("float32", "bfloat16") and derived
        if median == "n/a":  # only what cannot run here, and the row says why
            assert derived.startswith("n/a"), derived
        else:
            seconds, n = MEDIAN.fullmatch(median).groups()
            assert float(seconds) > 0 and int(n) == 1
    if name == "decode":  # budgets above the reduced config's K are clipped to it
        K = bench.tok_config("d18-d18", reduced=True).registers
        assert [r[0] for r in table] == [f"decode {K} tokens/frame, 2 Euler steps, guidance 1.0, {mode}"
                                         for mode in ("eager", "compiled Euler step")] + [
            f"progressive decode {K} tokens/frame, 2 Euler steps: {part}" for part in ("first frame", "all frames")]
        assert "x eager" in table[1][5] and all("x the joint decoding" in r[5] for r in table[2:])


def test_all_runs_every_benchmark_with_its_defaults_on_one_device(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "BENCHMARKS", {name: (lambda args, name=name: seen.append((name, args)), *rest)
                                              for name, (_, *rest) in bench.BENCHMARKS.items()})
    bench.main(["all", "--device", "cpu"])
    assert [name for name, _ in seen] == list(bench.BENCHMARKS)
    assert all(args.device == "cpu" and args.runs == 3 and args.reduced is None for _, args in seen)
    assert capsys.readouterr().out.count(bench.HEADER) == len(bench.BENCHMARKS)


def tiny_forward(model, cfg, B, T, side):
    latents = torch.randn(B, cfg.latent_channels, T, side, side)
    target = torch.randn(B, T, (side // cfg.patch_size) ** 2, cfg.repa_dim)
    return model(latents, repa_target=target)["loss"]


def test_flop_count_matches_torch_flop_counter():
    """Every pair attended (what SDPA's math kernel computes, which FlopCounterMode sees as matmuls): exact."""
    cfg = TokenizerConfig.preset("tiny", max_frames=5)
    model = VideoFlexTok(cfg)
    model.set_attention_backend("sdpa")
    B, T, side = 2, 5, 32
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        tiny_forward(model, cfg, B, T, side)
    assert forward.get_total_flops() == bench.tokenizer_flops(cfg, B, (T, side, side), masked=False)
    # The training step is counted as 3x the forward; the backward skips only the inputs' gradients.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        tiny_forward(model, cfg, B, T, side).backward()
    assert 2.9 * forward.get_total_flops() < step.get_total_flops() <= 3 * forward.get_total_flops()


def test_masked_flop_count_is_the_hand_count_of_attended_pairs():
    cfg = TokenizerConfig.preset("tiny", max_frames=5)
    B, T, side = 3, 5, 32
    P, K = (side // cfg.patch_size) ** 2, cfg.registers
    L = P + K
    # Encoder: all earlier frames; inside its frame a patch sees the P patches, register i the P patches and
    # registers 0..i. Decoder: frames up to its own. REPA head: the same over patches only.
    encoder = L * L * T * (T - 1) // 2 + T * (P * P + K * P + K * (K + 1) // 2)
    decoder, repa = L * L * T * (T + 1) // 2, P * P * T * (T + 1) // 2
    assert bench.attended_pairs("causal_registers", Layout(T, P, K)) == encoder
    assert bench.attended_pairs("time_causal", Layout(T, P, K)) == decoder
    assert bench.attended_pairs("time_causal", Layout(T, P, 0)) == repa
    S, D = T * L, cfg.dec_width  # every tiny width is 128
    skipped = 4 * D * (cfg.enc_depth * (S * S - encoder) + cfg.dec_depth * (S * S - decoder)
                       + cfg.repa_depth * ((T * P) ** 2 - repa))
    dense = bench.tokenizer_flops(cfg, B, (T, side, side), masked=False)
    assert dense - bench.tokenizer_flops(cfg, B, (T, side, side)) == B * skipped


def test_profile_table_names_the_costliest_operators(capsys):
    from bench import profile_table
    a = torch.randn(256, 256)
    profile_table(lambda: (a @ a).relu_(), torch.device("cpu"), 3, "a matmul")
    out = capsys.readouterr().out
    assert "| operator | calls | self time per step (ms) | share |" in out
    assert "| aten::mm | 1 |" in out  # two steps profiled, calls given per step
