// Validates prometheus-operator resources (ServiceMonitor, PodMonitor) offline against the
// schemas @kubernetes-models/prometheus-operator generates from the operator's API types:
// types, enums, patterns and required fields. Like the API server's strict field validation
// (kubectl's default), a field the schema does not declare is an error too: the generated
// validators do not check for them, so every object is wrapped in a Proxy that records which
// keys the validator looked at; a key it never read is unknown (a map, whose keys the
// validator iterates, accepts any key).
//
//   python3 -c 'yaml docs as JSON' | node crd.mjs      input: [{"file": ..., "doc": {...}}]
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";

const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
};

function watch(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  const node = { path, value, read: new Set(), map: false };
  seen.push(node);
  const children = new Map();
  return new Proxy(value, {
    get(target, key, receiver) {
      if (typeof key !== "string" || !Object.hasOwn(target, key)) return Reflect.get(target, key, receiver);
      node.read.add(key);
      if (!children.has(key)) children.set(key, watch(target[key], `${path}/${key}`, seen));
      return children.get(key);
    },
    has(target, key) {
      if (typeof key === "string") node.read.add(key);
      return Reflect.has(target, key);
    },
    ownKeys(target) {
      node.map = true;
      return Reflect.ownKeys(target);
    },
  });
}

function unknownFields(seen) {
  const out = [];
  for (const { path, value, read, map } of seen) {
    if (map || Array.isArray(value)) continue;
    for (const key of Object.keys(value)) if (!read.has(key)) out.push(`${path}/${key}`);
  }
  return out;
}

let failed = 0;
for (const { file, doc } of JSON.parse(readFileSync(0, "utf8"))) {
  const what = `${doc.kind}/${doc.metadata?.name}`;
  const Model = models[`${doc.apiVersion}/${doc.kind}`];
  if (!Model) {
    console.log(`ERROR ${file}: ${what}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  const problems = [];
  const validate = Model.prototype.validate;
  const seen = [];
  try {
    validate.call(watch(doc, "", seen));
  } catch (e) {
    problems.push(e.message);
  }
  for (const path of unknownFields(seen)) problems.push(`${path}: unknown field`);
  if (problems.length) {
    console.log(`ERROR ${file}: ${what} did not validate:\n  ${problems.join("\n  ")}`);
    failed++;
  } else {
    console.log(`INFO ${file}: ${what} passed (prometheus-operator schema, strict)`);
  }
}
process.exit(failed ? 1 : 0);
