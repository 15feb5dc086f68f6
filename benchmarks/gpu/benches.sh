# Sourced by run_all.sh (stage "bench"): the GPU benchmarks of issue 6. Uses run_bench and $PY.
# LSPO_GPU_BENCH picks groups (default: all), so the work can be split over several device calls:
#   kernels   projector kernels vs the dense backward GEMM (benchmarks/gpu/projector_gpu.py)
#   native    ~1.3B LLaMA, seq 1024, where torch AdamW fits: adamw vs lsp vs offload vs peers
#   capped    memory caps emulating commodity cards: 1.3B under 4 GB, 6.7B under 24 GB
GROUPS=${LSPO_GPU_BENCH:-kernels native capped}
hasg() { [[ " $GROUPS " == *" $1 "* ]]; }
L="$PY $ROOT/benchmarks/gpu/llama_iter.py --seq 1024"
if hasg kernels && [ -f "$ROOT/benchmarks/gpu/projector_gpu.py" ]; then
  run_bench projector "$PY" "$ROOT/benchmarks/gpu/projector_gpu.py"
fi
if hasg native; then
  # paper settings: d=1280, r=4 at ~1.3B, plus a larger d
  run_bench n13_adamw    $L --model 1.3b --batch 4 --opt adamw
  run_bench n13_lsp      $L --model 1.3b --batch 4 --opt lsp --subspace 1280 --nnz 4
  run_bench n13_lsp2048  $L --model 1.3b --batch 4 --opt lsp --subspace 2048 --nnz 8
  run_bench n13_offload  $L --model 1.3b --batch 4 --opt offload
  run_bench n13_torchao  $L --model 1.3b --batch 4 --opt torchao
  run_bench n13_deepspeed $L --model 1.3b --batch 4 --opt deepspeed
fi
if hasg capped; then
  run_bench c13_lsp_4g      $L --model 1.3b --batch 1 --ckpt --mem-cap-gb 4 --opt lsp --subspace 1280 --nnz 4
  run_bench c13_offload_4g  $L --model 1.3b --batch 1 --ckpt --mem-cap-gb 4 --opt offload
  run_bench c13_torchao_4g  $L --model 1.3b --batch 1 --ckpt --mem-cap-gb 4 --opt torchao
  run_bench c67_lsp_24g     $L --model 6.7b --batch 1 --ckpt --mem-cap-gb 24 --opt lsp --subspace 2048 --nnz 8
  run_bench c67_offload_24g $L --model 6.7b --batch 1 --ckpt --mem-cap-gb 24 --opt offload
  run_bench c67_torchao_24g $L --model 6.7b --batch 1 --ckpt --mem-cap-gb 24 --opt torchao
fi
