# The two README commands: `make run` (main job) and `make test` (whole suite); both set up the venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium

.PHONY: install run test lint audit bench browser
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedshop simulate --out runs/simulation --fresh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The privacy report is tested in a real browser: Debian's Chromium, never a downloaded one.
browser:
	@command -v chromium >/dev/null || $(APT) || ($(SUDO) apt-get update -q && $(APT))

# Two workers on the two cores: the deployment tests mostly wait on Flower's 3 s polls, so the
# rest runs beside them. One file's tests share a worker (--dist loadfile): the simulation tests
# share the local SuperLink's ports, the deployment tests theirs (39291…).
test: lint browser audit
	FEDSHOP_REQUIRE_BROWSER=1 $(PY) -m pytest -q -n 2 --dist loadfile

# Supply chain: pip-audit (dev extra) looks the installed dependencies up in PyPI's vulnerability
# data; a finding fails the run unless .ci/audit-allowlist.toml lists its id with a reason. The
# project itself is installed editable, not published, and is skipped. A dependency the service
# cannot look up is reported as not audited; AUDIT_STRICT=1 makes that fail the run as well.
AUDIT_ALLOW := .ci/audit-allowlist.toml
AUDIT_STRICT ?=
audit: $(STAMP)
	@$(PY) -c "$$AUDIT_IGNORES" $(AUDIT_ALLOW) > $(VENV)/audit-ignores
	@rm -f $(VENV)/audit.json
	@$(PY) -m pip_audit --skip-editable --progress-spinner off --desc on --format json \
		--output $(VENV)/audit.json $$(cat $(VENV)/audit-ignores); status=$$?; \
		$(PY) -c "$$AUDIT_REPORT" $(VENV)/audit.json "$(AUDIT_STRICT)" && exit $$status

define AUDIT_IGNORES
import sys, tomllib
path = sys.argv[1]
listed = tomllib.load(open(path, "rb")).get("vulnerability", {})
bad = [i for i, e in listed.items() if not (e.get("package") and str(e.get("reason", "")).strip())]
if bad:
    sys.exit(f"{path}: {', '.join(bad)}: every entry needs a package and a reason")
print(" ".join(f"--ignore-vuln {i}" for i in listed))
endef
export AUDIT_IGNORES

define AUDIT_REPORT
import json, os, sys
if not os.path.exists(sys.argv[1]):
    sys.exit("pip-audit stopped before auditing (its message is above)")
deps = json.load(open(sys.argv[1]))["dependencies"]
skipped = [d for d in deps if "skip_reason" in d and "editable" not in d["skip_reason"]]
for d in deps:
    for v in d.get("vulns", []):
        fix = ", ".join(v["fix_versions"]) or "no fixed release"
        print(f"{d['name']} {d['version']}: {v['id']} (fixed in: {fix}) {' '.join(v['description'].split())[:200]}")
audited = len([d for d in deps if "skip_reason" not in d])
print(f"pip-audit: {audited} dependencies audited against PyPI's vulnerability data")
if skipped:
    print(f"pip-audit: {len(skipped)} could not be looked up, so nothing is known about them: "
          f"{skipped[0]['skip_reason']}" + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    if sys.argv[2]:
        sys.exit("pip-audit: AUDIT_STRICT is set and not every dependency was audited")
endef
export AUDIT_REPORT

# Non-private vs DP users/s on the default and a Ta-Feng-sized data set (about 3 minutes on
# 2 cores). BENCH_ARGS="--quick" for a smoke run, "--tafeng PATH" to time the real file.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/throughput.py $(BENCH_ARGS)
