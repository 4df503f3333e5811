#!/usr/bin/env bash
# Regenerates the vendored JSON schemas of the custom resources fewstep's manifests use
# (tests/deploy/test_manifests.py checks the rendered objects against them with
# check-jsonschema). Source: the npm packages @kubernetes-models/keda and
# @kubernetes-models/prometheus-operator, whose TypeScript models are generated from the
# projects' own CRDs; ts-json-schema-generator turns the types named in crds.ts into JSON
# Schema (unknown fields rejected). InferenceService.json is written by hand (see its
# description): only the fields fewstep uses, from KServe's v1beta1 API.
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp crds.ts "$work/"
(
  cd "$work"
  npm init -y >/dev/null
  npm install --silent @kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0 \
    @kubernetes-models/apimachinery@3.0.2 ts-json-schema-generator@2.4.0 typescript@7.0.2
)
for kind in ScaledObject TriggerAuthentication ServiceMonitor PodMonitor PrometheusRule; do
  (cd "$work" && npx ts-json-schema-generator --path crds.ts --type "$kind" --no-type-check \
    -o "$kind.raw.json")
  python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), indent=1, sort_keys=True)' \
    "$work/$kind.raw.json" "$kind.json"
done
