#!/usr/bin/env node
// Calls a Tessera router from Node.js: Generate, GenerateStream and Embed through
// @grpc/grpc-js, with the service loaded at run time from protos/tessera/v1/inference.proto by
// @grpc/proto-loader (no generated code). Prints one JSON object on stdout.
//
//   npm install
//   node generate.js [ADDRESS] [--model NAME] [--prompt TEXT] [--max-new-tokens N]
//                    [--embed-model NAME] [--text TEXT]... [--timeout SECONDS]
//
// ADDRESS defaults to $TESSERA_ADDRESS or localhost:50051. $TESSERA_CA (a PEM file) switches to
// TLS; $TESSERA_TOKEN is sent as `authorization: Bearer <token>`.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

function parseArgs(argv) {
  const args = {
    address: process.env.TESSERA_ADDRESS || 'localhost:50051',
    model: 'smollm2-135m-instruct',
    prompt: 'The capital of France is',
    maxNewTokens: 16,
    embedModel: 'all-minilm-l6-v2',
    texts: [],
    timeout: 60,
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === '--model') args.model = value();
    else if (flag === '--prompt') args.prompt = value();
    else if (flag === '--max-new-tokens') args.maxNewTokens = Number(value());
    else if (flag === '--embed-model') args.embedModel = value();
    else if (flag === '--text') args.texts.push(value());
    else if (flag === '--timeout') args.timeout = Number(value());
    else if (!flag.startsWith('--')) args.address = flag;
    else throw new Error(`unknown flag ${flag}`);
  }
  if (args.texts.length === 0) args.texts = ['hello world', 'the cat sat on the mat'];
  return args;
}

function loadInference() {
  const definition = protoLoader.loadSync(path.join(PROTOS, 'tessera/v1/inference.proto'), {
    includeDirs: [PROTOS],
    keepCase: true,   // field names as in the .proto: max_new_tokens, finish_reason, ...
    longs: String,    // int64 token ids arrive as strings; converted below
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).tessera.v1;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const tessera = loadInference();
  const credentials = process.env.TESSERA_CA
    ? grpc.credentials.createSsl(fs.readFileSync(process.env.TESSERA_CA))
    : grpc.credentials.createInsecure();
  const client = new tessera.Inference(args.address, credentials);
  const metadata = new grpc.Metadata();
  if (process.env.TESSERA_TOKEN) metadata.set('authorization', `Bearer ${process.env.TESSERA_TOKEN}`);
  const options = () => ({ deadline: Date.now() + args.timeout * 1000 });

  const unary = (method, request) => new Promise((resolve, reject) => {
    client[method](request, metadata, options(), (err, reply) => (err ? reject(err) : resolve(reply)));
  });
  const stream = (request) => new Promise((resolve, reject) => {
    const chunks = [];
    const call = client.GenerateStream(request, metadata, options());
    call.on('data', (chunk) => chunks.push(chunk));
    call.on('error', reject);
    call.on('end', () => resolve(chunks));
  });

  const request = { model: args.model, prompt: args.prompt, max_new_tokens: args.maxNewTokens };
  (async () => {
    const generated = await unary('Generate', request);
    const chunks = await stream(request);
    const embedded = await unary('Embed', { model: args.embedModel, inputs: args.texts });
    const out = {
      address: args.address,
      generate: {
        text: generated.text,
        finish_reason: generated.finish_reason,
        prompt_tokens: generated.prompt_tokens,
        generated_tokens: generated.generated_tokens,
        cached: generated.cached,
        token_ids: generated.token_ids.map(Number),
      },
      stream: {
        text: chunks.map((c) => c.text).join(''),
        chunks: chunks.length,
        finish_reason: chunks.length ? chunks[chunks.length - 1].finish_reason : '',
      },
      embed: {
        dim: embedded.dim,
        embeddings: embedded.embeddings.map((e) => e.values),
      },
    };
    process.stdout.write(JSON.stringify(out) + '\n');
    client.close();
  })().catch((err) => {
    const code = grpc.status[err.code] || String(err.code);
    process.stderr.write(JSON.stringify({ error: { code, details: err.details || err.message } }) + '\n');
    client.close();
    process.exit(1);
  });
}

main();
