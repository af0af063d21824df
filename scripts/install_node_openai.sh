#!/usr/bin/env bash
# Install OpenAI's official Node client into <repo>/.tools/node-openai: the tests run it
# against the gateway's HTTP API as a Node user would (tests/integration/node_openai.cjs).
#
# Pinned: 6.49.0 is the newest release without a Node >= 22 requirement (Debian's Node is
# 20). Idempotent: a copy that loads is kept. Env: NODE_OPENAI_PACKAGE overrides the spec.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${repo_root}/.tools/node-openai"
package="${NODE_OPENAI_PACKAGE:-openai@6.49.0}"

if node -e "require('${dest}/node_modules/openai')" >/dev/null 2>&1; then
    echo "install_node_openai: ${dest} already loads; nothing to do"
    exit 0
fi
# Into a fresh folder, renamed into place last: a crash leaves nothing the check trusts.
rm -rf "${dest}.tmp"
mkdir -p "${dest}.tmp"
echo "install_node_openai: npm install ${package} into ${dest}"
npm install --prefix "${dest}.tmp" --no-audit --no-fund --silent "${package}"
rm -rf "${dest}"
mv "${dest}.tmp" "${dest}"
node -e "require('${dest}/node_modules/openai'); console.log('install_node_openai: ${package} loads')"
