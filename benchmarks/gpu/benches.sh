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
# EST_S is the expected time on an H200 (an estimate until a GPU run replaces it; the deadline check),
# LIMIT_S the per-bench timeout.
# LSPO_C13_D: the subspace d of c13_lsp_4g (default 384: LSPAdamW keeps an fp32 accumulator of S per
#   projected layer from its backward to step(), so d=1280 needs 1.03 GiB on top of 2.5 GiB of
#   weights; benchmarks/gpu/README.md has the arithmetic).
# LSPO_GPU_SMOKE=1: every llama_iter run becomes a tiny CPU run of the same command line (--smoke):
#   checks the harness and the command lines, measures no speed.
BENCH_SELECT=${LSPO_GPU_BENCH:-all}
C13_D=${LSPO_C13_D:-384}

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
