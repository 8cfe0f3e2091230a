# Set-up is part of each target: the first `make demo` or `make test` creates .venv and
# installs ml-framework with every CPU framework (PyTorch CPU build, TensorFlow CPU,
# scikit-learn) and the test tools.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -c constraints/cpu.txt -e '.[cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mlf demo

# pytest exits 5 when it collects no test: that is a failure here too.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) var
