# The GPU benchmarks of issues 6 and 16, sourced by run_all.sh (stage "bench"). Needs $PY, $ROOT and a
# runner `run_bench NAME TAGS EST_S LIMIT_S COMMAND...` from the caller (run_all.sh's starts the
# command under `timeout`, skips it when less than EST_S seconds are left before the deadline, and
# collects after every bench; tests/python/test_gpu_harness.py sources this file with a stub runner).
#
# LSPO_GPU_BENCH picks benches (default: all): a space-separated list of bench names and tags. Tags:
#   call1 / call2  the two device calls the run is split into (benchmarks/gpu/README.md)
#   pcie           pinned host <-> device copy bandwidth (the physical limit of every offload copy)
#   kernels        projector kernels vs the dense backward GEMM (benchmarks/gpu/projector_gpu.py)
#   native         ~1.3B LLaMA, seq 1024, on the whole card: adamw vs lsp vs offload vs the peers
#   capped         memory caps emulating commodity cards: 1.3B under 4 GiB, 6.7B under 24 GiB
#   expect-oom     runs that cannot fit by design (kept to show it; the table says "OOM (expected)")
#   tiers          LoHan memory tiers (issue 13): the largest LLaMA whose lspo.planner plan fits a 24 GiB card
#                  on the device machine, against the same model natively and against ZeRO-Offload
# EST_S is the expected time on an H200 (an estimate until a GPU run replaces it; the deadline check),
# LIMIT_S the per-bench timeout.
# LSPO_C13_D: the subspace d of c13_lsp_4g (default 384: LSPAdamW keeps an fp32 accumulator of S per
#   projected layer from its backward to step(), so d=1280 needs 1.03 GiB on top of 2.5 GiB of
#   weights; benchmarks/gpu/README.md has the arithmetic).
# LSPO_TIERS_MODEL: the model of the tmax_* benches (default 30b; 13b if the host's 128 GiB run out, see below).
# LSPO_GPU_SMOKE=1: every llama_iter run becomes a tiny CPU run of the same command line (--smoke):
#   checks the harness and the command lines, measures no speed.
BENCH_SELECT=${LSPO_GPU_BENCH:-all}
C13_D=${LSPO_C13_D:-384}
TIERS_MODEL=${LSPO_TIERS_MODEL:-30b}

bench() {  # NAME TAGS EST_S LIMIT_S COMMAND...: run it when its name or one of its tags is selected
  local name=$1 tags=$2 tok t
  for tok in $BENCH_SELECT; do
    if [[ $tok == all || $tok == "$name" ]]; then run_bench "$@"; return; fi
    for t in $tags; do
      if [[ $tok == "$t" ]]; then run_bench "$@"; return; fi
    done
  done
}

L="$PY $ROOT/benchmarks/gpu/llama_iter.py --seq 1024${LSPO_GPU_SMOKE:+ --smoke}"

# ---- call 1: physical limits, kernels, the native 1.3B comparison, 6.7B LSP under 24 GiB
bench pcie          "pcie call1"    10 60  "$PY" "$ROOT/benchmarks/gpu/pcie.py"
bench projector     "kernels call1" 30 150 "$PY" "$ROOT/benchmarks/gpu/projector_gpu.py"
# paper settings at ~1.3B: d=1280, r=4
bench n13_adamw     "native call1"  25 120 $L --model 1.3b --batch 4 --opt adamw
bench n13_lsp       "native call1"  40 150 $L --model 1.3b --batch 4 --opt lsp --subspace 1280 --nnz 4
bench c67_lsp_24g   "capped call1"  60 240 $L --model 6.7b --batch 1 --ckpt --mem-cap-gb 24 --opt lsp --subspace 2048 --nnz 8
bench n13_offload   "native call1"  45 180 $L --model 1.3b --batch 4 --opt offload
bench n13_torchao   "native call1"  45 180 $L --model 1.3b --batch 4 --opt torchao

# ---- call 2: the rest, most important first (a bench that no longer fits is skipped, the next tried)
bench c13_lsp_4g    "capped call2"  35 150 $L --model 1.3b --batch 1 --ckpt --mem-cap-gb 4 --opt lsp --subspace "$C13_D" --nnz 4
bench c13_torchao_4g "capped call2" 45 180 $L --model 1.3b --batch 1 --ckpt --mem-cap-gb 4 --opt torchao
bench n13_lsp2048   "native call2"  40 150 $L --model 1.3b --batch 4 --opt lsp --subspace 2048 --nnz 8
bench c67_torchao_24g "capped call2" 120 240 $L --model 6.7b --batch 1 --ckpt --mem-cap-gb 24 --opt torchao --steps 3 --warmup 1
# full offload keeps the dense bf16 gradients on the card (2.5 GiB at 1.3B) next to 2.5 GiB of weights
bench c13_offload_4g "capped call2 expect-oom" 25 120 $L --model 1.3b --batch 1 --ckpt --mem-cap-gb 4 --opt offload
# DeepSpeed JIT-compiles its CPU Adam on first use (about 70 s on the 2-core VM): last
bench n13_deepspeed "native call2" 150 300 $L --model 1.3b --batch 4 --opt deepspeed
# (no c67_offload_24g: lspo's full offload keeps 28 B/param on the host (fp32 master, m, v, each twice
#  for the speculative double buffer, + bf16 gradient and output buffers): 189 GB at 6.74B params on a
#  128 GiB host; and its bf16 gradients (12.6 GiB) next to the weights (12.6 GiB) exceed 24 GiB anyway)

# ---- tiers (issue 13, LoHan; at the end of call 2: a session that runs them selects LSPO_GPU_BENCH=tiers).
# The largest model: `llama_iter.py --plan --model M --opt lsp --subspace 1024 --nnz 8 --plan-device-gb 22
# --plan-host-gb 110` (benchmarks/gpu/README.md has the numbers): 30b (32.5 B params, LLaMA-1 33B shapes) is
# the largest whose plan fits (device estimate 18.95 GiB, host 84.3 GiB), the decoder layers' bf16 weights
# (59.8 GiB) streamed from pinned host memory, window 4, activations keep 5 / recompute 55; 65B's weights
# alone (122 GiB) do not fit the 110 GiB host budget. Device budget 22 of the
# 23.5 GiB the cap leaves: the planner does not count the fp32 loss/logits (0.4 GiB at 1 x 1024) nor the
# allocator's rounding. Host budget 110 of 128 GiB: pinned buffers are rounded up to powers of two by
# torch's host allocator (59.8 GiB of layer weights take ~75 GiB pinned), which the planner does not know.
# LSPAdamW, not OffloadAdamW: full offload's state (24 B/param in host memory, 12 B/param per generation
# on disk, and persist() writes the whole state to the state directory every step) puts 30b at ~780 GB
# of state -- the 64 GiB disk holds OffloadAdamW's checkpoint up to ~2.5 B params. LSPAdamW's state
# (dense embeddings/head + d x d moments per projected layer) is ~19 GiB and fits the host: the plan keeps
# it there (--state-dir is given for when it does not). --refit-every 0: a refit check step holds an fp32
# copy of every projected gradient until step() (130 GB at 32.5 B params); no run here refits.
# Times: building 32.5 B params on the host (random init: 1.3B took 36.7 s on the 2-core VM, ~110 s scaled
# to 16 cores) and pinning them ~10-20 s, per step ~3 x 60 GiB
# of weight copies (forward, recomputation, backward) + 60 GiB of gradients back at ~50 GB/s PCIe
# ~5 s + LSPAdamW's compress/apply on the host's 16 cores (~5 s, an estimate); 1 + 2 steps.
TIERS="--batch 1 --opt lsp --subspace 1024 --nnz 8 --refit-every 0 --steps 2 --warmup 1"
TIERS_PLAN="--mem-cap-gb 24 --plan-device-gb 22 --plan-host-gb 110 --state-dir /tmp/lspo-state"
bench tmax_lsp_tiers_24g "tiers call2" 240 420 $L --model "$TIERS_MODEL" $TIERS $TIERS_PLAN
# the same model without tiers under the cap: its bf16 weights alone exceed 23.5 GiB (OOM while building)
bench tmax_lsp_24g "tiers call2 expect-oom" 25 120 $L --model "$TIERS_MODEL" $TIERS --ckpt --mem-cap-gb 24
# the same model natively on the whole card (60.6 GiB of weights + LSP buffers fit 139 GiB): time reference
bench tmax_lsp_native "tiers call2" 60 240 $L --model "$TIERS_MODEL" $TIERS --ckpt
# ZeRO-Offload cannot run 30b (nor 13b) on this machine: ZeRO-2 keeps the bf16 weights on the card
# (60.6 GiB > 23.5) and 16 B/param fp32 on the host (fp32 weights, gradients, m, v: 520 GB > 128 GiB). The
# comparison with it is at 6.7B, where its host side needs 108 GB of the 128 GiB (it may still be killed
# for host memory; the row then says so): 6.7B with tiers, against c67_lsp_24g (call 1: LSP with the
# weights resident under the same cap) and ZeRO-Offload under the same cap (its CPU Adam JIT-compiles
# first, ~70 s on the 2-core VM; its 6.7B CPU Adam step on 16 cores: ~2-3 s, a guess): last.
bench t67_lsp_tiers_24g "tiers call2" 90 240 $L --model 6.7b $TIERS $TIERS_PLAN
bench t67_deepspeed_24g "tiers call2" 240 300 $L --model 6.7b --batch 1 --ckpt --mem-cap-gb 24 --opt deepspeed --steps 2 --warmup 1
