#!/usr/bin/env python3
"""Checks the Prometheus rules and the Grafana dashboard against what the daemon exports.

  python3 scripts/checks/metric_names.py          (from the repository root)

1. deploy/grafana/credproxy.json is valid JSON with the structure Grafana needs: a title, uid
   and schemaVersion, a datasource variable (or a DS_PROMETHEUS input) that every panel and
   query uses, `job` and `instance` variables that every credproxy selector filters on, unique
   panel ids and refIds, grid positions inside the 24 columns that do not overlap.
2. Every metric name in a PromQL expression of deploy/prometheus/credproxy.rules.yml and of the
   dashboard is exported by the daemon: a "credproxy_..." string literal in src/metrics/
   (histograms as _bucket, _sum and _count), `up`, or a recording rule of the rules file.
3. Best effort: a value of the label outcome, result or reason that an expression selects
   must be one the daemon defines for that family (src/metrics/: the `Label values of`
   constants, the values each family is initialised with, the "(a, b, c)" list in its help
   text; for credproxy_backend_requests_total, `ManagerError::outcome` in
   src/manager/mod.rs), and a selector may only use the family's own labels, job and
   instance (and le on _bucket).

With `--dashboard-rules FILE` it also writes the dashboard's queries (variables replaced) as
recording rules to FILE, for `promtool check rules` to parse.

Python standard library only. Exits 1 and names every problem.
"""

import json
import re
import sys
from pathlib import Path

METRICS_RS = Path("src/metrics")
MANAGER_RS = Path("src/manager/mod.rs")
RULES = Path("deploy/prometheus/credproxy.rules.yml")
DASHBOARD = Path("deploy/grafana/credproxy.json")

# Metrics an alert is written against before the daemon exports them: a warning, not a
# failure, until they are (see the comment above the alert in the rules file).
PROPOSED: set[str] = set()

# Labels every scraped series carries (added by Prometheus), besides the family's own.
TARGET_LABELS = {"job", "instance"}
# Labels whose selected values are checked against the daemon's closed sets.
CHECKED_LABELS = ("outcome", "result", "reason")
# Of those, labels whose values must be known: selecting an unknown set is an error.
MUST_KNOW = ("outcome", "result")

PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
    # aggregation operators, also written `sum by (x) (...)`
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}

errors = []
warnings = []


def error(msg):
    errors.append(msg)


# --- what the daemon exports -------------------------------------------------------------------

class Family:
    def __init__(self, name, histogram):
        self.name = name
        self.histogram = histogram
        self.labels = set()
        self.values = {}  # label -> set of values, where known

    def add_values(self, label, values):
        self.values.setdefault(label, set()).update(values)


def string_list(text):
    return re.findall(r'"([^"\\]*)"', text)


def read_daemon():
    src = "\n".join(p.read_text() for p in sorted(METRICS_RS.glob("*.rs")))
    families = {}
    for m in re.finditer(r'(HistogramOpts::new\(\s*)?"(credproxy_[a-z0-9_]+)"', src):
        name = m.group(2)
        if name not in families:
            families[name] = Family(name, histogram=m.group(1) is not None)
    if not families:
        sys.exit(f"{METRICS_RS}: no \"credproxy_...\" metric names found")

    # `let var = register(r, Kind::new(Opts::new("name", "help"), &["label", ...]).unwrap());`
    # and the helpers' `let var = counter_vec(r, "name", "help", &["label", ...]);` /
    # `let var = gauge(r, "name", "help");`
    var_family = {}
    registrations = [
        (m.group(1), m.group(2))
        for m in re.finditer(r"let\s+(\w+)\s*=\s*register\(\s*r\s*,(.*?)\.unwrap\(\),?\s*\);", src, re.S)
    ] + [
        (m.group(1), m.group(2))
        for m in re.finditer(r"let\s+(\w+)\s*=\s*(?:counter_vec|gauge)\(\s*r\s*,(.*?)\);", src, re.S)
    ]
    for var, body in registrations:
        name = re.search(r'"(credproxy_[a-z0-9_]+)"', body)
        if not name:
            continue
        fam = families[name.group(1)]
        var_family[var] = fam
        label_lists = re.findall(r"&\[([^\]]*)\]", body)
        if label_lists:
            fam.labels.update(string_list(label_lists[-1]))
        # Help text "... (a, b, c)." lists the values of the family's one checked label.
        literals = string_list(body)
        help_text = literals[1] if len(literals) > 1 else ""
        checked = [l for l in CHECKED_LABELS if l in fam.labels]
        lists = re.findall(r"\(([a-z_]+(?:, [a-z_]+)+)\)", help_text)
        if len(checked) == 1 and lists:
            fam.add_values(checked[0], [v.strip() for v in lists[-1].split(",")])

    # `/// Label values of `family{label}` ...` above `pub const NAME: [&str; N] = [...];`
    consts = {}
    for m in re.finditer(r"((?:[ \t]*///[^\n]*\n)*)[ \t]*pub const (\w+): \[&str; \d+\]\s*=\s*\[(.*?)\];", src, re.S):
        doc, const, values = m.group(1), m.group(2), string_list(m.group(3))
        consts[const] = values
        for fam_name, label in re.findall(r"`(credproxy_[a-z0-9_]+)\{(\w+)\}`", doc):
            if fam_name in families:
                families[fam_name].add_values(label, values)

    # `for x in CONST { var.with_label_values(&[x]); }` and `for x in ["a", "b"] { ... }`
    for m in re.finditer(r"for \w+ in (\w+|\[[^\]]*\])\s*\{\s*(\w+)\s*\.with_label_values", src):
        source, var = m.group(1), m.group(2)
        fam = var_family.get(var)
        if fam is None or len(fam.labels) != 1:
            continue
        values = consts.get(source, []) if not source.startswith("[") else string_list(source)
        if values:
            fam.add_values(next(iter(fam.labels)), values)

    # The outcome of a secrets manager call: "success", or `ManagerError::outcome`.
    backend = families.get("credproxy_backend_requests_total")
    if backend is not None and MANAGER_RS.exists():
        body = re.search(r"pub fn outcome\(&self\) -> &'static str \{(.*?)\n    \}", MANAGER_RS.read_text(), re.S)
        if body:
            backend.add_values("outcome", ["success"] + re.findall(r'=> "(\w+)"', body.group(1)))

    exported = {"up": Family("up", False)}
    for fam in families.values():
        if fam.histogram:
            for suffix in ("_bucket", "_sum", "_count"):
                exported[fam.name + suffix] = fam
        else:
            exported[fam.name] = fam
    return families, exported


# --- PromQL expressions --------------------------------------------------------------------

def rules_expressions():
    """(where, expr) for every rule, and the recording rules' names; a small YAML reader for
    `expr:` as an inline value or a block scalar (| or >), enough for the rules file."""
    lines = RULES.read_text().splitlines()
    exprs, records, rules = [], set(), 0
    name = "?"
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)(?:- )?(alert|record|expr):\s*(.*?)\s*$", line)
        i += 1
        if not m:
            continue
        indent, key, value = len(m.group(1)), m.group(2), m.group(3)
        if key in ("alert", "record"):
            rules += 1
            name = value.strip("'\"")
            if key == "record":
                records.add(name)
            continue
        if re.fullmatch(r"[|>][-+]?", value):
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            value = " ".join(block).strip()
        elif value[:1] in "'\"":
            value = value[1:-1]
        exprs.append((f"{RULES} rule {name}", value))
    if len(exprs) != rules:
        error(f"{RULES}: found {rules} rules but {len(exprs)} expressions; the reader needs `expr:` on every rule")
    return exprs, records


def dashboard_expressions(dash):
    exprs = []
    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                exprs.append((f"{DASHBOARD} panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", q):
            continue  # label_values(label): no metric
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q) \
            or re.fullmatch(r"\s*query_result\((.*)\)\s*", q)
        exprs.append((f"{DASHBOARD} variable {v.get('name')}", m.group(1) if m else q))
    return exprs


STRING = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'


def metric_names(expr):
    e = re.sub(STRING, '""', expr)
    e = re.sub(r"\[[^\]]*\]", "", e)             # ranges, subqueries
    e = re.sub(r"\{[^}]*\}", "", e)              # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)
    names = []
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)", e):
        word = m.group(1)
        if word.lower() in PROMQL_KEYWORDS or re.match(r"\s*\(", e[m.end():]):
            continue
        names.append(word)
    return names


def selectors(expr):
    """(metric, [(label, op, value)]) for every `metric{...}` in expr."""
    out = []
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\s*\{((?:" + STRING + r"|[^}\"'`])*)\}", expr):
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"', m.group(2))
        out.append((m.group(1), matchers))
    return out


def check_expressions(exprs, records, exported):
    seen = set()
    for where, expr in exprs:
        for name in metric_names(expr):
            if name in records:
                continue
            if name in exported:
                seen.add(name)
                continue
            if name in PROPOSED:
                warnings.append(f"{where}: {name} is not exported yet (proposed metric)")
                continue
            hint = ""
            if ":" in name:
                hint = " (not a recording rule of the rules file)"
            elif name + "_bucket" in exported:
                hint = " (a histogram: use _bucket, _sum or _count)"
            error(f"{where}: unknown metric {name}{hint}\n    in: {' '.join(expr.split())}")
        for name, matchers in selectors(expr):
            fam = exported.get(name)
            if fam is None or name == "up":
                continue
            allowed = fam.labels | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            for label, op, value in matchers:
                if label not in allowed:
                    error(f"{where}: {name} has no label {label!r} (labels: {', '.join(sorted(fam.labels)) or 'none'})")
                    continue
                if label not in CHECKED_LABELS or "$" in value:
                    continue
                if op in ("=~", "!~"):
                    if not re.fullmatch(r"\w+(\|\w+)*", value):
                        continue  # a real regular expression: not checked
                    values = value.split("|")
                else:
                    values = [value]
                known = fam.values.get(label)
                if known is None:
                    if label in MUST_KNOW:
                        error(f"{where}: cannot check {name}{{{label}}}: no values for it are defined in {METRICS_RS}")
                    continue
                for v in values:
                    if v not in known:
                        error(f"{where}: {name}{{{label}={v!r}}}: the daemon defines only {', '.join(sorted(known))}")
    return seen


# --- the dashboard's structure -------------------------------------------------------------

def check_dashboard():
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, json.JSONDecodeError) as e:
        error(f"{DASHBOARD}: not valid JSON: {e}")
        return None
    if not isinstance(dash, dict):
        error(f"{DASHBOARD}: not a JSON object")
        return None
    for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list)):
        if not isinstance(dash.get(key), kind) or not dash.get(key):
            error(f"{DASHBOARD}: missing or empty {key!r} ({kind.__name__})")
    if isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] < 36:
        error(f"{DASHBOARD}: schemaVersion {dash['schemaVersion']} is older than 36")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds_refs = set()
    for name, v in variables.items():
        if v.get("type") == "datasource" and v.get("query") == "prometheus":
            ds_refs |= {f"${{{name}}}", f"${name}"}
    for i in dash.get("__inputs", []):
        if i.get("type") == "datasource" and i.get("pluginId") == "prometheus":
            ds_refs |= {f"${{{i.get('name')}}}"}
    if not ds_refs:
        error(f"{DASHBOARD}: no Prometheus datasource variable or __inputs entry")
    for name in ("job", "instance"):
        if variables.get(name, {}).get("type") != "query":
            error(f"{DASHBOARD}: no query variable {name!r}")

    ids, boxes = set(), []
    def walk(ps):
        for p in ps:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(dash.get("panels", [])):
        title = p.get("title")
        where = f"{DASHBOARD} panel {title!r}"
        if not isinstance(p.get("id"), int) or p["id"] in ids:
            error(f"{where}: missing or duplicate id {p.get('id')!r}")
        ids.add(p.get("id"))
        if not p.get("type") or not title:
            error(f"{where}: missing type or title")
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["w"] <= 0 or g["h"] <= 0 \
                or g["x"] < 0 or g["x"] + g["w"] > 24:
            error(f"{where}: bad gridPos {g}")
        else:
            box = (g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"])
            for other_title, o in boxes:
                if box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3]:
                    error(f"{where}: overlaps panel {other_title!r}")
            boxes.append((title, box))
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") not in ds_refs:
            error(f"{where}: datasource {p.get('datasource')} is not the datasource variable")
        targets = p.get("targets") or []
        if not targets:
            error(f"{where}: no queries")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
            error(f"{where}: missing or duplicate refId {ref_ids}")
        for t in targets:
            if not (t.get("expr") or "").strip():
                error(f"{where} {t.get('refId')}: empty expr")
            if "datasource" in t and (t["datasource"] or {}).get("uid") not in ds_refs:
                error(f"{where} {t.get('refId')}: datasource {t['datasource']} is not the datasource variable")
            for name, matchers in selectors(t.get("expr") or ""):
                if name.startswith("credproxy_") or name == "up":
                    have = {(l, op, v) for l, op, v in matchers}
                    for var in ("job", "instance"):
                        if (var, "=~", f"${var}") not in have:
                            error(f"{where} {t.get('refId')}: {name} does not filter on {var}=~\"${var}\"")
    return dash


def write_dashboard_rules(path, dash_exprs):
    """The dashboard's queries as recording rules, with Grafana's variables replaced, so that
    `promtool check rules` parses their PromQL."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dash_exprs):
        e = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
        e = re.sub(r"\$\{?\w+\}?", ".*", e)
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(e)}"]
    Path(path).write_text("\n".join(lines) + "\n")


def main():
    families, exported = read_daemon()
    dash = check_dashboard()
    rule_exprs, records = rules_expressions()
    dash_exprs = dashboard_expressions(dash) if dash else []
    if len(sys.argv) == 3 and sys.argv[1] == "--dashboard-rules":
        write_dashboard_rules(sys.argv[2], dash_exprs)
    used = check_expressions(rule_exprs + dash_exprs, records, exported)
    for w in warnings:
        print(f"warning: {w}")
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        print(f"metric_names: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    unused = sorted(f.name for f in families.values()
                    if not any(u == f.name or u.startswith(f.name + "_") for u in used))
    print(f"metric_names: {len(rule_exprs)} rule and {len(dash_exprs)} dashboard expressions use "
          f"{len(used)} exported series names, all known ({len(families)} families in {METRICS_RS}; "
          f"not used: {', '.join(unused) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
