# samplebench: `make demo` and `make test` work on a fresh machine (they build .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= demo
ARGS   ?=

.PHONY: install system-deps demo test lint sweep report check bench bench-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# k-diffusion is a test-only reference for the samplers; its extras (wandb, clip, ...) are not needed
	$(BIN)/python -m pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $(STAMP)

install: $(STAMP)

system-deps: ## Debian packages the tests use: chromium (HTML report test), Slurm and munge (launcher tests);
	@# installed where apt-get and root are available (CI); elsewhere those tests skip and say why
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	for p in slurmctld slurmd sbatch munged; do command -v $$p >/dev/null 2>&1 || { missing="$$missing slurm"; break; }; done; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium slurmctld slurmd slurm-client munge >/dev/null \
			|| echo "apt-get install failed: the browser and Slurm tests will be skipped"; \
		else echo "not installed:$$missing (needs apt-get and root): those tests will be skipped"; fi; \
	fi

demo: install ## the default sweep (5 samplers x 3 NFE x 1000 samples on the exact analytic model)
	$(BIN)/samplebench sweep run=$(RUN) $(ARGS)
	@echo "report: results/$(RUN)/leaderboard.md and results/$(RUN)/plots/"

test: install system-deps ## the whole test suite, CPU only
	$(BIN)/ruff check samplebench tests bench
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check samplebench tests bench
	$(BIN)/ruff format --check samplebench tests bench

sweep: install ## make sweep ARGS="sampler=ddim,dpmpp nfe=5,10 run=mine"
	$(BIN)/samplebench sweep $(ARGS)

report: install ## make report RUN=demo
	$(BIN)/samplebench report run=$(RUN)

check: install ## the CI regression check: a small analytic sweep against results/baselines/gmm-small.csv
	$(BIN)/samplebench sweep sampler=ddim,dpmpp,unipc nfe=5,10 guidance=1,2 num_images=500 \
		metrics.bootstrap=200 run=ci-check
	$(BIN)/samplebench check run=ci-check --baseline results/baselines/gmm-small.csv

bench: install ## benchmarks (not tests); figures go to BENCHMARKS.md
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_timings.py --tree after=. --runs 2
	$(BIN)/python bench/bench_vs_diffusers.py
	$(BIN)/python bench/bench_schedules.py
	$(BIN)/python bench/bench_calibration.py
	$(BIN)/python bench/bench_papers.py  # the papers' samplers against their bases on the analytic model
	$(BIN)/python bench/bench_features.py --n 1000 10000  # about an hour on 2 CPU cores
	$(BIN)/python bench/bench_metrics_memory.py  # 10-30 min on 2 CPU cores (exact-ODE references of 110k samples)

bench-gpu: install ## GPU figures in one command (< 10 min on an H100, offline); writes its BENCHMARKS.md section
	$(BIN)/python bench/bench_gpu.py $(ARGS)

clean:
	find results -mindepth 1 -maxdepth 1 ! -name baselines ! -name README.md -exec rm -rf {} +
