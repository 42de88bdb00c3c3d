// A nestkv client in Node.js that knows nothing but protos/nestkv/v1/store.proto.
// Usage: node client.js HOST:PORT PROTO_DIR
// Reads what the Python side wrote, writes a key for it to read, prints JSON.
"use strict";
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, protoDir] = process.argv.slice(2);
const definition = protoLoader.loadSync("nestkv/v1/store.proto", {
  includeDirs: [protoDir],
  keepCase: true,
  longs: Number,
  defaults: true,
});
const { StoreService } = grpc.loadPackageDefinition(definition).nestkv.v1;
const client = new StoreService(target, grpc.credentials.createInsecure());

function call(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 5000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    ),
  );
}

async function main() {
  const path = ["poly", "glot"];
  const read = await call("Get", { path, key: "from-python" });
  const ttl = await call("ExpiresIn", { path, key: "from-python" });
  await call("Set", {
    path,
    key: "from-node",
    value: Buffer.from("hello from node ✓"),
    expires_in: { seconds: 60, nanos: 0 },
  });
  const missing = await call("Get", { path: ["poly"], key: "from-python" });
  let invalid = null;
  try {
    await call("Set", { path: ["poly", ""], key: "k", value: Buffer.from("") });
  } catch (error) {
    invalid = { code: error.code, details: error.details };
  }
  console.log(
    JSON.stringify({
      found: read.found,
      value: Buffer.from(read.value).toString("utf8"),
      ttl_found: ttl.found,
      ttl_seconds: ttl.expires_in ? Number(ttl.expires_in.seconds) : null,
      other_namespace_found: missing.found,
      invalid,
    }),
  );
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
