// Pull a model through corral with the ollama package for JavaScript, as a JS app does: print
// each progress part it hands over (one JSON line each), then {"done": true}, or
// {"thrown": message} when it raised.
import { Ollama } from 'ollama'

const [host, model] = process.argv.slice(2)
const client = new Ollama({ host })
try {
  for await (const part of await client.pull({ model, stream: true })) {
    console.log(JSON.stringify(part))
  }
  console.log(JSON.stringify({ done: true }))
} catch (err) {
  console.log(JSON.stringify({ thrown: String(err?.message ?? err) }))
}
