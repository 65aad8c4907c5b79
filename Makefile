# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; pip takes it before anything else so no multi-GB CUDA build sneaks in.
TORCH  ?= torch==2.13.0

STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test serve
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unlearn-gateway demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/unlearn-gateway serve
