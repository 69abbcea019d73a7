// Validates prometheus-operator objects (JSON list on stdin) against the CRD schemas compiled into
// @kubernetes-models/prometheus-operator. Usage: node validate_monitoring.mjs MODELS_DIR < objects.json
// Prints one JSON line per object: {"kind", "name", "errors": [...]}; exits 0 when it could check them all.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modelsDir = process.argv[2];
const entry = join(modelsDir, "node_modules", "@kubernetes-models", "prometheus-operator",
  "monitoring.coreos.com", "v1", "index.js");
const models = await import(pathToFileURL(entry).href);
const objects = JSON.parse(readFileSync(0, "utf8"));
for (const object of objects) {
  const Model = models[object.kind];
  if (object.apiVersion !== "monitoring.coreos.com/v1" || !Model) {
    console.log(JSON.stringify({ kind: object.kind, name: object.metadata?.name, errors: [`no model for ${object.apiVersion} ${object.kind}`] }));
    continue;
  }
  let errors = [];
  try {
    new Model(object).validate();
  } catch (error) {
    errors = [String(error.message ?? error)];
  }
  console.log(JSON.stringify({ kind: object.kind, name: object.metadata.name, errors }));
}
