// Drives the real embedder and ranker from Node.js with @grpc/grpc-js, loading the
// .proto files from protos/ as they ship. Started by tests/test_node_client.py, which
// passes the services' addresses, the token, a photo and where to write the results:
//   IMAGESEARCH_EMBEDDER, IMAGESEARCH_RANKER, IMAGESEARCH_AUTH_TOKEN, PHOTO, OUT
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const definition = protoLoader.loadSync(["imagesearch/v1/embedder.proto", "imagesearch/v1/ranker.proto"], {
  includeDirs: [PROTOS], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).imagesearch.v1;

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set`);
  return value;
};
const creds = grpc.credentials.createInsecure();
const options = { "grpc.max_send_message_length": 64 << 20, "grpc.max_receive_message_length": 64 << 20 };
const embedder = new v1.EmbedderService(env("IMAGESEARCH_EMBEDDER"), creds, options);
const ranker = new v1.RankerService(env("IMAGESEARCH_RANKER"), creds, options);
const auth = new grpc.Metadata();
auth.set("authorization", `Bearer ${env("IMAGESEARCH_AUTH_TOKEN")}`);
const deadline = () => new Date(Date.now() + 60_000);
const results = {};

const unary = (client, method, request, metadata = auth) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata, { deadline: deadline() }, (err, reply) => (err ? reject(err) : resolve(reply))));

const serverStream = (client, method, request) =>
  new Promise((resolve, reject) => {
    const replies = [];
    const call = client[method](request, auth, { deadline: deadline() });
    call.on("data", (reply) => replies.push(reply));
    call.on("error", reject);
    call.on("end", () => resolve(replies));
  });

const clientStream = (client, method, requests) =>
  new Promise((resolve, reject) => {
    const call = client[method](auth, { deadline: deadline() }, (err, reply) => (err ? reject(err) : resolve(reply)));
    for (const request of requests) call.write(request);
    call.end();
  });

test("embed a photo, upsert it, search for it, and get status codes for bad input", async (t) => {
  const info = await unary(embedder, "GetModelInfo", {});
  assert.ok(info.dim > 0 && info.fingerprint.length === 64, JSON.stringify(info));

  const photo = readFileSync(env("PHOTO"));
  const embedded = await unary(embedder, "Embed", { image: photo, name: "photo.jpg" });
  assert.equal(embedded.vector.length, info.dim);
  assert.equal(embedded.fingerprint, info.fingerprint);
  const norm = Math.hypot(...embedded.vector);
  assert.ok(Math.abs(norm - 1) < 1e-4, `norm ${norm}`);
  results.vector = embedded.vector;

  const other = embedded.vector.map((x, i) => (i % 2 ? x : -x));
  const upserted = await clientStream(ranker, "Upsert", [
    { collection: "node", name: "photo.jpg", vector: embedded.vector, fingerprint: embedded.fingerprint },
    { collection: "node", name: "other.jpg", vector: other, fingerprint: embedded.fingerprint },
  ]);
  assert.equal(upserted.upserted, 2);

  const replies = await serverStream(ranker, "Search",
    { collection: "node", vector: embedded.vector, top_k: 2, fingerprint: embedded.fingerprint });
  results.matches = replies.map((r) => r.match);
  assert.deepEqual(results.matches.map((m) => [m.rank, m.name]), [[1, "photo.jpg"], [2, "other.jpg"]]);
  assert.ok(Math.abs(results.matches[0].score - 1) < 1e-4);

  await t.test("bad input: INVALID_ARGUMENT naming the item", async () => {
    await assert.rejects(unary(embedder, "Embed", { image: Buffer.from("not an image"), name: "junk.jpg" }), (err) => {
      assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
      assert.match(err.details, /junk\.jpg/);
      results.bad_input = err.code;
      return true;
    });
  });
  await t.test("unknown collection: NOT_FOUND", async () => {
    await assert.rejects(serverStream(ranker, "Search", { collection: "nope", vector: embedded.vector }), (err) => {
      assert.equal(err.code, grpc.status.NOT_FOUND);
      results.unknown_collection = err.code;
      return true;
    });
  });
  await t.test("no token: UNAUTHENTICATED", async () => {
    await assert.rejects(unary(embedder, "GetModelInfo", {}, new grpc.Metadata()), (err) => {
      assert.equal(err.code, grpc.status.UNAUTHENTICATED);
      results.no_token = err.code;
      return true;
    });
  });
  writeFileSync(env("OUT"), JSON.stringify(results));
  embedder.close();
  ranker.close();
});
