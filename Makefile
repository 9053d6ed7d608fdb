# The two commands of README.md, and what they need.
#   make demo   receive an echo study over DICOM, classify it, send the SR back, show it
#   make test   the whole test suite
# Both set up a virtual environment (.venv) with the CPU build of torch and,
# where apt-get is available and they are missing, the Debian packages the suite's real peers need
# (the same list .ci/run installs): dcmtk, Orthanc with its DICOMweb and Python plugins, dicom3tools, Chromium.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.echonode-installed

.PHONY: demo test setup system-packages clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin the torch build first: a bare requirement would pull a CUDA build.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train,test]"
	touch $(STAMP)

setup: $(STAMP)

system-packages:
	@missing=""; \
	for t in /usr/bin/storescu /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/share/orthanc/plugins/libOrthancPython.so /usr/bin/dciodvfy /usr/bin/systemd-analyze /usr/bin/openssl /usr/bin/chromium /usr/bin/chromedriver; do [ -x $$t ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk orthanc orthanc-dicomweb orthanc-python dicom3tools openssl systemd chromium chromium-driver >/dev/null; \
	  else echo "install dcmtk, orthanc, orthanc-dicomweb, orthanc-python, dicom3tools, openssl, systemd, chromium and chromium-driver (Debian packages) for the full suite"; fi; \
	fi

demo: setup
	$(VENV)/bin/echonode demo

test: setup system-packages
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
