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
	# Export the sentence encoder to ONNX, distil its static table and embed the generic negatives now, as the
	# gateway image does at build time: on a slow CPU they take minutes, which the first server would otherwise
	# spend before it answers (tests wait 60 s for a server).
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m classifiers.warm
	touch $(STAMP)

.PHONY: install demo test serve
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unlearn-gateway demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/unlearn-gateway serve
