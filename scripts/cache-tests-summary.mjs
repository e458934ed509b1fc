// Summarises http-tests/cache-tests results the way cache-tests.fyi colours them.
// Usage: node cache-tests-summary.mjs CHECKOUT [NAME=]RESULT.json ... [--failures-of=NAME]
// Prints, per implementation: required passed/failed, optional passed/failed, checks,
// setup/harness/dependency failures (counted as the site does: a test whose dependency did
// not pass is "dep", whatever its kind); with --failures-of, the required tests NAME did
// not pass. Browser-only tests are left out.
import path from 'path'
import fs from 'fs'
import { pathToFileURL } from 'url'

const [checkout, ...rest] = process.argv.slice(2)
const failuresOf = (rest.find(a => a.startsWith('--failures-of=')) || '').slice(14)
const files = rest.filter(a => !a.startsWith('--'))
const load = rel => import(pathToFileURL(path.join(checkout, rel)).href)
const { default: suites } = await load('tests/index.mjs')
const { determineTestResult, resultTypes } = await load('test-engine/lib/results.mjs')

const names = Object.fromEntries(Object.entries(resultTypes).map(([k, v]) => [v[2], k]))
console.log('implementation        req-pass req-fail opt-pass opt-fail check-yes check-no setup harness dep')
for (const arg of files) {
  const [name, file] = arg.includes('=') ? arg.split('=') : [path.basename(arg, '.json'), arg]
  const results = JSON.parse(fs.readFileSync(file, 'utf8'))
  const c = {}
  const failures = []
  for (const suite of suites) {
    for (const test of suite.tests) {
      if (test.browser_only) continue
      const kind = test.kind || 'required'
      const r = names[determineTestResult(suites, test.id, results)[2]]
      const key = r === 'pass' ? (kind === 'required' ? 'req-pass' : 'opt-pass')
        : r === 'fail' ? 'req-fail'
          : r === 'optional_fail' ? 'opt-fail'
            : r === 'yes' ? 'check-yes' : r === 'no' ? 'check-no'
              : r === 'setup_fail' ? 'setup' : r === 'harness_fail' ? 'harness'
                : r === 'dependency_fail' ? 'dep' : r
      c[key] = (c[key] || 0) + 1
      if (kind === 'required' && r !== 'pass' && r !== 'untested') failures.push(`${test.id} (${r})`)
    }
  }
  const cols = ['req-pass', 'req-fail', 'opt-pass', 'opt-fail', 'check-yes', 'check-no', 'setup', 'harness', 'dep']
  console.log(name.padEnd(22) + cols.map(k => String(c[k] || 0).padStart(k.length + 1)).join(''))
  if (name === failuresOf) failures.forEach(f => console.log('    not passed: ' + f))
}
