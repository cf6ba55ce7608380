# `make test` and `make demo` work on a fresh machine: they create .venv, install, then run.
# TORCH pins a CPU build for laptops and CI. GPU users: `make test TORCH=torch` (or any CUDA wheel).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: setup test demo bench clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

# The whole pipeline on the built-in synthetic data, CPU, a fresh run each time (out/demo/):
# data -> tiny tokenizer -> token cache -> class- and text-conditional AR models on the first 4
# tokens of every frame (the paper's cheaper AR setting) -> samples at 1, 2 and 4 tokens per frame
# -> the tokenizer's codebook usage and flow loss with and without its tokens -> a held-out clip
# reconstructed at every budget -> adherence tables. Sized to finish in about 15 minutes on 2 cores;
# at this size the samples are not yet recognisable: `eval.py ceiling` measures the steps it would
# take (see README). The tokenizer trains with uniform noise levels: in 500 steps, logit-normal ones
# leave the decoder untrained near t = 1, where sampling starts (eval.py flow shows it).
DEMO     = out/demo
DEMO_TOK = $(DEMO)/tok/ckpt-0000500.pt
CLIP     = --frames 9
AR       = --tokens-per-frame 4 --steps 250 --lr 1e-3 --sample-every 0 --ckpt-every 250 --log-every 50

demo: setup
	rm -rf $(DEMO)
	$(PY) data.py synthetic $(DEMO)/data --num 480 --size 32
	$(PY) data.py synthetic $(DEMO)/heldout --num 8 --seed 1 --size 32
	$(PY) train_tok.py --data $(DEMO)/data --run-dir $(DEMO)/tok $(CLIP) --steps 500 --lr 1e-3 --val-every 500 --ckpt-every 500 --log-every 100 --time-sampling uniform
	$(PY) train_ar.py --tokenize --tok-ckpt $(DEMO_TOK) --data $(DEMO)/data $(CLIP) --cache $(DEMO)/tokens
	$(PY) train_ar.py --cache $(DEMO)/tokens --cond class --run-dir $(DEMO)/ar-class $(AR)
	$(PY) train_ar.py --cache $(DEMO)/tokens --cond text --run-dir $(DEMO)/ar-text $(AR)
	for k in 1 2 4; do \
	  $(PY) sample.py --ar-ckpt $(DEMO)/ar-text/ckpt-0000250.pt --prompt "a red circle moving left" --num-samples 8 --tokens-per-frame $$k $(CLIP) --out $(DEMO)/text-k$$k || exit 1; \
	  $(PY) sample.py --ar-ckpt $(DEMO)/ar-class/ckpt-0000250.pt --class blue_square_up --num-samples 8 --tokens-per-frame $$k $(CLIP) --out $(DEMO)/class-k$$k || exit 1; \
	done
	$(PY) eval.py codes --tok-ckpt $(DEMO_TOK) --data $(DEMO)/data $(CLIP) --num 96
	$(PY) eval.py flow --tok-ckpt $(DEMO_TOK) --data $(DEMO)/data $(CLIP) --num 32 --sheet $(DEMO)/one-step.png
	$(PY) sample.py --tok-ckpt $(DEMO_TOK) --reconstruct $(DEMO)/heldout/red_circle_left/red_circle_left_00000.mp4 $(CLIP) --out $(DEMO)/reconstruct
	for d in $(DEMO)/text-k* $(DEMO)/class-k*; do echo "== $$d"; $(PY) eval.py adherence $$d | tail -5 || exit 1; done

# Every benchmark at reduced size on CPU (real size, bf16, on CUDA); tables in BENCHMARKS.md.
bench: setup
	OMP_NUM_THREADS=1 $(PY) bench.py all

clean:
	rm -rf $(VENV) out .pytest_cache
