# Two entry points a fresh machine needs: `make demo` and `make test`. Each creates the virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[cpu,test,ray,service]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/audit demo

# The service page's test runs in Debian's chromium (driven by Playwright); installed here when missing.
test: install
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium) || \
		echo "chromium not installed: the service page's browser test will be skipped"
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/runtime.py

.PHONY: install demo test bench
