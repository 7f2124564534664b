# shellcheck shell=bash disable=SC2034
# Versions of the test bed's peers. Sourced by the scripts in hack/; the build
# cache is keyed by these, so changing one rebuilds only what it names.
KUBERNETES_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
MOTO_VERSION=5.2.5
# kstatus, the status library of Flux, kpt and cli-utils (hack/testbed/kstatus).
CLI_UTILS_VERSION=v0.37.2
# gopher-lua, the Lua VM Argo CD runs health checks with (hack/testbed/argocd-health).
GOPHER_LUA_VERSION=v1.1.2
# promtool, which unit-tests the chart's alerting rules (the Go module of
# Prometheus v3.x is tagged v0.3xx).
PROMETHEUS_VERSION=v0.316.0
TESTBED_CACHE="${AMICOPY_CACHE:-$HOME/.cache/ami-copy-operator}/testbed"
