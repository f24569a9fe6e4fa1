#!/usr/bin/env bash
# The diagnosis runs of docs/perf/two-gpu-h200.md (v2lite_bf16: one GPU, a half batch, both GPUs visible,
# mpirun -np 1, dp=2 one rank per GPU, dp=2 both ranks on GPU 0, initcheck and memcheck).
# Usage: tests/gpu/bf16_layout_diag.sh DILU OUT_DIR REPO_ROOT
set -u
D=$1; out=$2; mkdir -p $out; cd $out
M=$3/tests/golden/data/v2lite_bf16/model
python3 - $M/../input.jsonl <<'PY'
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows: r["logprobs"]=5
open("all.jsonl","w").write("".join(json.dumps(r)+"\n" for r in rows))
open("even.jsonl","w").write("".join(json.dumps(r)+"\n" for r in rows[0::2]))
PY
C="--set cuda.fp8_gemm=soft --set kv.num_blocks=256 --set batch.max_seqs=8 --overwrite"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
CUDA_VISIBLE_DEVICES=0 $D run --model $M --input all.jsonl --output a1.jsonl $C > a1.log 2>&1
CUDA_VISIBLE_DEVICES=0 $D run --model $M --input all.jsonl --output a2.jsonl $C > a2.log 2>&1
CUDA_VISIBLE_DEVICES=0 $D run --model $M --input even.jsonl --output even.jsonl.out $C > even.log 2>&1
$D run --model $M --input all.jsonl --output vis2.jsonl $C > vis2.log 2>&1
mpirun -np 1 --bind-to none $D run --model $M --input all.jsonl --output np1.jsonl $C > np1.log 2>&1
mpirun -np 2 --bind-to none $D run --model $M --input all.jsonl --output dp2.jsonl $C --set parallel.dp=2 > dp2.log 2>&1
CUDA_VISIBLE_DEVICES=0 mpirun -np 2 --bind-to none $D run --model $M --input all.jsonl --output dp2g0.jsonl $C --set parallel.dp=2 > dp2g0.log 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 60 compute-sanitizer --tool initcheck --print-limit 10 $D run --model $M --input even.jsonl --output init_even.jsonl $C > initcheck_even.log 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 60 compute-sanitizer --tool memcheck --print-limit 10 $D run --model $M --input even.jsonl --output mem_even.jsonl $C > memcheck_even.log 2>&1
for f in a1 a2 even.jsonl vis2 np1 dp2 dp2g0 init_even mem_even; do
  g=$f.jsonl; [ "$f" = even.jsonl ] && g=even.jsonl.out
  echo "== $f"; python3 -c "
import json,sys
for l in sorted(open('$g'), key=lambda l: json.loads(l)['id']):
    r=json.loads(l); print(r['id'], r['token_ids'][:8], [round(x['logprob'],3) for x in r['logprobs'][:4]])
" 2>&1 | head -5
done
grep -h "ERROR SUMMARY\|Uninitialized\|Invalid" initcheck_even.log memcheck_even.log | sort | uniq -c | head -20
