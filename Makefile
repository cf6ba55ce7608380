# `make test` and `make demo` work on a fresh machine: they create .venv, install, then run.
# TORCH pins a CPU build for laptops and CI. GPU users: `make test TORCH=torch` (or any CUDA wheel).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: setup test demo demo-train bench clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

# make demo: the bundled demo models (assets/demo) sample "a red circle moving left" and a class at every
# token budget, reconstruct held-out clips, and print PSNR, adherence and the token-position probe (demo.py).
demo: setup
	$(PY) demo.py --out out/demo --data $(DEMO_DATA)

# make demo-train: the recipe that made assets/demo, from scratch, seeded. Each stage is a file target and
# the training stages run with --resume, so an interrupted run continues where it stopped: run it again.
# DEVICE=cuda trains on a GPU. Measured times are in the README.
DEVICE    ?= cpu
DEMO_DATA  = out/demo-data
DEMO_WORK  = out/demo-train
DEMO_CLIP  = --frames 5 --fps 4
DEMO_VAE   = --vae demo --vae-ckpt $(DEMO_WORK)/vae.pt
TOK_STEPS  = 20000
# The text model learns the caption's last words (the motion) later than the class model learns its classes.
AR_STEPS_class = 1000
AR_STEPS_text  = 3000
AR_FLAGS   = --preset demo --batch-size 32 --lr 1e-3 --ckpt-every 500 --log-every 100 \
             --sample-every 0 --num-workers 0 --resume --device $(DEVICE)

$(DEMO_DATA)/data/synthetic.json: | $(VENV)/.installed
	$(PY) synthetic.py $(DEMO_DATA)/data --num 1920 --size 32 --frames 5 --fps 4
$(DEMO_DATA)/heldout/synthetic.json: | $(VENV)/.installed
	$(PY) synthetic.py $(DEMO_DATA)/heldout --num 96 --seed 1 --size 32 --frames 5 --fps 4
$(DEMO_WORK)/vae.pt: $(DEMO_DATA)/data/synthetic.json
	$(PY) demo.py train-vae --data $(DEMO_DATA)/data $(DEMO_CLIP) --out $@ --device $(DEVICE)
$(DEMO_WORK)/tok.done: $(DEMO_WORK)/vae.pt
	$(PY) train_tok.py --preset demo --data $(DEMO_DATA)/data $(DEMO_CLIP) $(DEMO_VAE) --cache $(DEMO_WORK)/latents \
	  --run-dir $(DEMO_WORK)/tok --batch-size 32 --lr 2e-3 --steps $(TOK_STEPS) --val-every 10000 --ckpt-every 1000 \
	  --log-every 100 --num-workers 0 --resume --device $(DEVICE)
	touch $@
$(DEMO_WORK)/tokens.done: $(DEMO_WORK)/tok.done
	$(PY) train_ar.py --tokenize --tok-ckpt $(lastword $(sort $(wildcard $(DEMO_WORK)/tok/ckpt-*.pt))) \
	  --data $(DEMO_DATA)/data $(DEMO_CLIP) $(DEMO_VAE) --cache $(DEMO_WORK)/tokens --num-workers 0 --device $(DEVICE)
	touch $@
$(DEMO_WORK)/ar-%.done: $(DEMO_WORK)/tokens.done
	$(PY) train_ar.py --cache $(DEMO_WORK)/tokens --cond $* --run-dir $(DEMO_WORK)/ar-$* --steps $(AR_STEPS_$*) $(AR_FLAGS)
	touch $@

demo-train: setup $(DEMO_DATA)/heldout/synthetic.json $(DEMO_WORK)/ar-class.done $(DEMO_WORK)/ar-text.done
	$(PY) demo.py export --work $(DEMO_WORK) --data $(DEMO_DATA) --out assets/demo
	$(PY) demo.py --out $(DEMO_WORK)/demo --data $(DEMO_DATA) && cp $(DEMO_WORK)/demo/demo.png assets/demo/demo.png

# Every benchmark at reduced size on CPU (real size, bf16, on CUDA); tables in BENCHMARKS.md.
bench: setup
	OMP_NUM_THREADS=1 $(PY) bench.py all

clean:
	rm -rf $(VENV) out .pytest_cache
