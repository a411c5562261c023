#!/usr/bin/env bash
# Checks the deploy files (`make deploy-check`):
#   1. deploy/tradecanvas.service (and the roles' template deploy/tradecanvas@.service) keeps the settings the design relies on (Type=notify, …);
#   2. `systemd-analyze verify` finds no error or warning in it;
#   3. `systemd-analyze security --offline=yes` rates its exposure 2.5 or lower;
#   4. deploy/tradecanvas.env lists every TRADE_CANVAS_* flag, and its commented-out values
#      are the real defaults (they parse, and give the same RuntimeFlags as no file at all);
#   5. the Prometheus alert rules pass `promtool check rules` and their unit tests
#      (`promtool test rules`), and the Grafana dashboard is valid JSON.
# Steps 2–3 need systemd-analyze (systemd ≥ 250 for --offline), step 5 promtool (Debian's
# `prometheus` package; .ci/run installs it); where one is missing its steps are reported as
# SKIPPED, never as passed. tests/test_deploy_observability.py checks that every metric name
# the dashboard and the rules use is on a running daemon's /metrics. Exit status: 0 all checks passed (or skipped), 1 not.
set -euo pipefail

cd "$(dirname "$0")/.."
ENV_EXAMPLE=deploy/tradecanvas.env
MAX_EXPOSURE=2.5
INSTALLED_EXEC=/opt/tradecanvas/.venv/bin/tradecanvas
PYTHON=${PYTHON:-.venv/bin/python}

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
pass() { echo "ok:   $*"; }
skip() { echo "SKIPPED: $*"; }

# steps 1–3 for one unit file: check_unit FILE NAME STATE_LINE — NAME is the file name the
# verify copy gets (a template is verified as one of its instances)
check_unit() {
UNIT=$1
unit_name=$2
state_line=$3
# --- 1. the settings the daemon and the docs rely on --------------------------------------
for line in \
    "Type=notify" \
    "NotifyAccess=main" \
    "WatchdogSec=30" \
    "Restart=on-failure" \
    "RestartPreventExitStatus=2" \
    "DynamicUser=yes" \
    "$state_line" \
    "EnvironmentFile=-/etc/tradecanvas/tradecanvas.env" \
    "LoadCredential=ingest-token:/etc/tradecanvas/ingest-token" \
    "ExecStart=$INSTALLED_EXEC serve" \
    "ProtectSystem=strict" \
    "NoNewPrivileges=yes" \
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" \
    "SystemCallFilter=@system-service" \
    "CapabilityBoundingSet="; do
    if grep -qxF -- "$line" "$UNIT"; then pass "$UNIT has $line"; else fail "$UNIT lacks the line $line"; fi
done
stop_s=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$UNIT")
# the daemon exits within 10 s of SIGTERM; systemd must not SIGKILL it before that
if [[ -n "$stop_s" && "$stop_s" -gt 10 ]]; then
    pass "TimeoutStopSec=$stop_s is above the 10 s drain"
else
    fail "TimeoutStopSec must be a number of seconds above 10 (the drain deadline)"
fi

# --- 2. systemd-analyze verify ------------------------------------------------------------
if ! command -v systemd-analyze >/dev/null 2>&1; then
    skip "systemd-analyze is not installed: unit verify and security rating not run"
else
    workdir=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: each unit has its own folder
    trap "rm -rf '$workdir'" EXIT
    # verify insists that ExecStart's program exists and is executable, and in a checkout
    # /opt/tradecanvas does not. So we verify a copy that differs from the unit in that one
    # path: it points at this checkout's own installed `tradecanvas` (same program, same
    # arguments) or, before `make` has created .venv, at `true`. Every other line is
    # verified exactly as shipped.
    if [[ -x .venv/bin/tradecanvas ]]; then
        stand_in="$PWD/.venv/bin/tradecanvas"
    else
        stand_in=$(command -v true)
        echo "note: .venv/bin/tradecanvas not built yet; ExecStart verified with $stand_in"
    fi
    sed "s#^ExecStart=$INSTALLED_EXEC #ExecStart=$stand_in #" "$UNIT" >"$workdir/$unit_name"
    if ! grep -q "^ExecStart=$stand_in serve$" "$workdir/$unit_name"; then
        fail "could not point ExecStart of the verify copy at $stand_in"
    fi
    set +e
    verify_out=$(systemd-analyze verify --man=no --recursive-errors=no \
        "$workdir/$unit_name" 2>&1)
    verify_rc=$?
    set -e
    # verify exits 0 on mere warnings (an unknown key is "ignoring"), so any line about our
    # unit counts as a failure too
    ours=$(grep -F "$unit_name" <<<"$verify_out" || true)
    if [[ $verify_rc -ne 0 || -n "$ours" ]]; then
        fail "systemd-analyze verify (exit $verify_rc):"
        echo "${verify_out//$workdir\//}" >&2
    else
        [[ -n "$verify_out" ]] && echo "note (other units): $verify_out"
        pass "systemd-analyze verify $UNIT"
    fi

    # --- 3. security exposure ---------------------------------------------------------
    version=$(systemd-analyze --version | awk 'NR == 1 { print $2 }')
    if [[ "$version" -lt 250 ]]; then
        skip "systemd $version has no 'security --offline'; exposure rating not run"
    else
        set +e
        # --threshold is the exposure × 10; the exit status is non-zero above it
        security_out=$(systemd-analyze security --offline=yes \
            --threshold="$(awk -v m="$MAX_EXPOSURE" 'BEGIN { print int(m * 10) }')" "$workdir/$unit_name" 2>&1)
        security_rc=$?
        set -e
        overall=$(grep -F "Overall exposure level" <<<"$security_out" || true)
        exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$overall")
        if [[ -z "$exposure" ]]; then
            fail "no exposure rating from systemd-analyze security:"
            echo "$security_out" >&2
        elif [[ $security_rc -ne 0 ]] \
            || awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e > m) }'; then
            fail "exposure $exposure is above $MAX_EXPOSURE:"
            grep -F "✗" <<<"$security_out" >&2 || true
        else
            pass "$overall (limit $MAX_EXPOSURE)"
        fi
    fi
fi
rm -rf "${workdir:-}"
}

check_unit deploy/tradecanvas.service tradecanvas.service "StateDirectory=tradecanvas"
# the roles (ingest, edge): one instance per role, verified as tradecanvas@edge-a
check_unit "deploy/tradecanvas@.service" "tradecanvas@edge-a.service" "StateDirectory=tradecanvas/%i"

# --- 4. the example environment file ------------------------------------------------------
if [[ ! -x "$PYTHON" ]]; then
    skip "$PYTHON not found (run make first): $ENV_EXAMPLE not checked against the flags"
else
    if "$PYTHON" - "$ENV_EXAMPLE" <<'PY'; then
import re
import sys
from pathlib import Path

from tradecanvas.runtime_flags import FLAG_SPECS, build_runtime_flags

FLAGS = {spec.variable for spec in FLAG_SPECS}

text = Path(sys.argv[1]).read_text()
listed = dict(re.findall(r"^#?(TRADE_CANVAS_[A-Z0-9_]+)=(.*)$", text, flags=re.M))
problems = [f"{v} is not listed" for v in sorted(FLAGS - set(listed))]
problems += [f"{v} is not a flag" for v in sorted(set(listed) - FLAGS)]
active = re.findall(r"^(TRADE_CANVAS_[A-Z0-9_]+)=", text, flags=re.M)
problems += [f"{v} is not commented out (the example must change nothing)" for v in active]
# under systemd, StateDirectory= sets STATE_DIRECTORY; the token has no default
systemd_env = {"STATE_DIRECTORY": "/var/lib/tradecanvas"}
given = {k: v for k, v in listed.items() if v != ""}
try:
    documented = build_runtime_flags({**systemd_env, **given}).flags
except Exception as exc:
    problems.append(f"the listed values do not parse: {exc}")
else:
    defaults = build_runtime_flags(systemd_env).flags
    for spec in FLAG_SPECS:
        # a flag unset by default shows an example that parses (a blank value is refused)
        example = spec.default is None and getattr(defaults, spec.field) is None
        if not example and getattr(documented, spec.field) != getattr(defaults, spec.field):
            problems.append(f"{spec.variable}={listed[spec.variable]} is not the default")
for problem in problems:
    print(f"FAIL: {sys.argv[1]}: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
        pass "$ENV_EXAMPLE lists every flag with its default"
    else
        fail "$ENV_EXAMPLE does not match runtime_flags.FLAG_SPECS"
    fi
fi

# --- 5. Prometheus rules and the Grafana dashboard ------------------------------------------
RULES=deploy/prometheus/tradecanvas.rules.yml
RULES_TEST=deploy/prometheus/tradecanvas.rules.test.yml
DASHBOARD=deploy/grafana/tradecanvas.json
if ! command -v promtool >/dev/null 2>&1; then
    skip "promtool is not installed (apt-get install prometheus): $RULES not checked"
else
    if rules_out=$(promtool check rules "$RULES" 2>&1); then
        pass "promtool check rules $RULES"
    else
        fail "promtool check rules $RULES:"
        echo "$rules_out" >&2
    fi
    if tests_out=$(promtool test rules "$RULES_TEST" 2>&1); then
        pass "promtool test rules $RULES_TEST"
    else
        fail "promtool test rules $RULES_TEST:"
        echo "$tests_out" >&2
    fi
fi
if python3 -m json.tool "$DASHBOARD" >/dev/null; then
    pass "$DASHBOARD is valid JSON"
else
    fail "$DASHBOARD is not valid JSON"
fi

if [[ $failures -gt 0 ]]; then
    echo "deploy check: $failures failure(s)" >&2
    exit 1
fi
echo "deploy check: all passed"
