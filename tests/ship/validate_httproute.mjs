// Validates Gateway API HTTPRoutes (JSON array on stdin) against the schema that the npm package
// @kubernetes-models/gateway-api compiles from Gateway API's Go types (experimental fields
// included): types, enums, patterns, required fields. Prints one JSON line: [{name, errors}].
// It does not reject unknown fields (the OpenAPI schema allows them); test_kubernetes.py checks
// those against the package's type declarations.
//
//   node validate_httproute.mjs <node_modules dir> < routes.json
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const model = join(modules, "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute.js");
const { HTTPRoute } = await import(pathToFileURL(model).href);

const results = JSON.parse(readFileSync(0, "utf8")).map((route) => {
  try {
    new HTTPRoute(route).validate();
    return { name: route.metadata?.name ?? null, errors: [] };
  } catch (error) {
    return { name: route.metadata?.name ?? null, errors: [String(error.message ?? error)] };
  }
});
console.log(JSON.stringify(results));
