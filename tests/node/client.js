// A Node.js client of caprouter.v1: Route, Generate (streaming), the health check and an error.
// Usage: node client.js HOST:PORT   -> prints one JSON object with what it got.
// A server with API keys: CAPROUTER_API_KEY. TLS: CAPROUTER_TLS_CA (PEM), and for mutual TLS
// CAPROUTER_TLS_CERT / CAPROUTER_TLS_KEY; CAPROUTER_TLS_SERVER_NAME when the address is an IP.
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const address = process.argv[2] || '127.0.0.1:50051';
const opts = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const router = grpc.loadPackageDefinition(loader.loadSync('caprouter/v1/router.proto',
  { ...opts, includeDirs: [path.join(__dirname, '..', '..', 'proto')] })).caprouter.v1;
const health = grpc.loadPackageDefinition(loader.loadSync(path.join(__dirname, 'health.proto'), opts)).grpc.health.v1;

const env = process.env;
const read = (p) => (p ? fs.readFileSync(p) : null);
const creds = env.CAPROUTER_TLS_CA
  ? grpc.credentials.createSsl(read(env.CAPROUTER_TLS_CA), read(env.CAPROUTER_TLS_KEY), read(env.CAPROUTER_TLS_CERT))
  : grpc.credentials.createInsecure();
const channelOptions = env.CAPROUTER_TLS_SERVER_NAME ? { 'grpc.ssl_target_name_override': env.CAPROUTER_TLS_SERVER_NAME } : {};
const metadata = () => {
  const md = new grpc.Metadata();
  if (env.CAPROUTER_API_KEY) md.add('authorization', `Bearer ${env.CAPROUTER_API_KEY}`);
  return md;
};

const deadline = (s) => ({ deadline: new Date(Date.now() + s * 1000) });
const client = new router.Router(address, creds, channelOptions);
const healthClient = new health.Health(address, creds, channelOptions);

const unary = (c, method, req, s = 30) => new Promise((resolve, reject) =>
  c[method](req, metadata(), deadline(s), (err, res) => (err ? reject(err) : resolve(res))));

function generate(req) {
  return new Promise((resolve, reject) => {
    const out = { chunks: 0, text: '', backend: '', decision_id: '', completion_tokens: 0, finish_reason: '' };
    const call = client.Generate(req, metadata(), deadline(120));
    call.on('data', (chunk) => {
      out.chunks += 1;
      if (chunk.start) { out.backend = chunk.start.backend; out.decision_id = chunk.start.decision_id; }
      out.text += chunk.text;
      if (chunk.end) { out.completion_tokens = chunk.end.usage.completion_tokens; out.finish_reason = chunk.end.finish_reason; }
    });
    call.on('error', reject);
    call.on('end', () => resolve(out));
  });
}

(async () => {
  const result = {};
  const h = await unary(healthClient, 'Check', { service: 'caprouter.v1.Router' });
  result.health = h.status;
  const r = await unary(client, 'Route', { prompt: 'What is 7 + 5?', knobs: { cost_weight: 0.04 } });
  result.route = { backend: r.backend, decision_id: r.decision_id, api_version: r.metadata.api_version,
    candidates: r.candidates.map((c) => ({ backend: c.backend, predicted_quality: c.predicted_quality, rank: c.rank })) };
  result.generate = await generate({ prompt: 'What is the capital of France?', params: { max_tokens: 12 } });
  try {
    await unary(client, 'Route', { prompt: '' });
    result.error = null;
  } catch (e) {
    result.error = { code: e.code, name: grpc.status[e.code], details: e.details };
  }
  process.stdout.write(JSON.stringify(result) + '\n');
  client.close();
  healthClient.close();
})().catch((e) => { process.stderr.write(String(e.stack || e) + '\n'); process.exit(1); });
