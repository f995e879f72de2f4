# Two entry points for a newcomer: `make demo` and `make test`.
# Everything lives in .venv; nothing is installed outside the checkout.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := out/tubingen_starry_night.png

.PHONY: demo test bench serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Installs the project, then stylises the bundled Tübingen photo as The Starry Night.
demo: $(VENV)/.installed
	@mkdir -p out
	$(BIN)/nst stylize examples/tubingen.jpg examples/starry_night.jpg -o $(DEMO) --size 384 --steps 80 --overwrite

# Installs the test extra, lints and checks the formatting (ruff, configured in pyproject.toml),
# then runs the whole test suite (CPU; CUDA tests skip without a GPU).
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

$(VENV)/.installed-serve: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[serve]'
	touch $@

# Installs the serve extra and starts the HTTP service and its page on http://127.0.0.1:8000 (see README).
serve: $(VENV)/.installed-serve
	$(BIN)/nst serve

# The speed matrix on this machine (see README, "Speed"); results also as JSON under out/.
bench: $(VENV)/.installed-test
	mkdir -p out
	$(BIN)/nst bench --json out/bench.json --overwrite

clean:
	rm -rf out .pytest_cache .benchmarks
