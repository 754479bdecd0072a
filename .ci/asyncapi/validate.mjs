// Validates an AsyncAPI document with @asyncapi/parser, the AsyncAPI initiative's reference
// parser: our own Python checks cannot prove that other AsyncAPI tools accept the document.
// Usage: node validate.mjs FILE. Prints every diagnostic, one a line; exits 1 if any is an
// error or the parser returns no document, 2 on bad usage or an unreadable file.
import { readFile } from 'node:fs/promises';
import { DiagnosticSeverity, Parser } from '@asyncapi/parser';

const SEVERITY = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};

const [file] = process.argv.slice(2);
if (!file) {
  console.error('usage: node validate.mjs FILE');
  process.exit(2);
}

let source;
try {
  source = await readFile(file, 'utf8');
} catch (error) {
  console.error(`${file}: ${error.message}`);
  process.exit(2);
}

const { document, diagnostics } = await new Parser().parse(source, { source: file });
for (const { severity, code, message, path } of diagnostics) {
  console.log(`${SEVERITY[severity] ?? severity} ${code} /${path.join('/')}: ${message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).length;
if (errors > 0 || document === undefined) {
  console.log(`${file}: invalid (${errors} error${errors === 1 ? '' : 's'})`);
  process.exit(1);
}
console.log(`${file}: valid AsyncAPI ${document.version()}`);
