// A nestkv client in Node.js that knows nothing but protos/nestkv/v1/store.proto, and googleapis'
// google/rpc/status.proto and error_details.proto to read a failed call's details.
// Usage: node client.js HOST:PORT PROTO_DIRS [SEGMENT...]
// (PROTO_DIRS: the folders to find the .proto files in, separated by the platform's path
// delimiter: nestkv's protos/, and one holding google/rpc/*.proto.)
// Reads what the Python side wrote under the namespace SEGMENT... (default: poly glot),
// writes a key for it to read and SPREAD_KEYS more (spread-0 ...), reads those back, adds to two
// counters with the Increment RPC (and tries to add to the text Python wrote), prints one JSON
// line. Given one node of a cluster it needs nothing more: the node forwards each operation to
// its key's owner, so the spread keys land on several nodes.
//
// Environment:
//   NESTKV_CA_FILE  PEM file of the CA to trust: connect over TLS (otherwise plaintext)
//   NESTKV_TOKEN    token sent as `authorization: Bearer <token>` call credentials;
//                   needs NESTKV_CA_FILE (grpc-js sends call credentials over TLS only)
//
// What a program acts on in a failure is read from fields, never from the message: a call's
// google.rpc.Status (the grpc-status-details-bin trailer) and its ErrorInfo (reason, applied), and
// a Pipeline operation's OperationError (reason and applied, enums of store.proto).
//
// A call that fails with a gRPC status ends the run with exit code 2 and the JSON line
// {"error": {"method", "code", "details", "fields"}}; any other failure exits with 1.
"use strict";
const fs = require("fs");
const nodePath = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const [target, protoDirList, ...segments] = process.argv.slice(2);
const protoDirs = protoDirList.split(nodePath.delimiter);
const path = segments.length ? segments : ["poly", "glot"];
const caFile = process.env.NESTKV_CA_FILE || null;
const token = process.env.NESTKV_TOKEN || null;

function channelCredentials() {
  if (!caFile) {
    if (token) {
      throw new Error("NESTKV_TOKEN needs NESTKV_CA_FILE: call credentials go over TLS only");
    }
    return grpc.credentials.createInsecure();
  }
  const tls = grpc.credentials.createSsl(fs.readFileSync(caFile));
  if (!token) return tls;
  const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    callback(null, metadata);
  });
  return grpc.credentials.combineChannelCredentials(tls, bearer);
}

// int64 fields (Increment's amount and value, Duration.seconds) come back as decimal strings:
// a JS Number holds integers exactly only up to 2**53. A request may give them as a number or
// as a decimal string (exact at any size).
const definition = protoLoader.loadSync("nestkv/v1/store.proto", {
  includeDirs: protoDirs,
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const { StoreService } = grpc.loadPackageDefinition(definition).nestkv.v1;
const client = new StoreService(target, channelCredentials());

// google.rpc.Status and its details, to decode the grpc-status-details-bin trailer.
const rpcProtos = new protobuf.Root();
rpcProtos.resolvePath = (_origin, target) =>
  protoDirs.map((dir) => nodePath.join(dir, target)).find((file) => fs.existsSync(file)) || target;
rpcProtos.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = rpcProtos.lookupType("google.rpc.Status");

// The fields of a failed call a program acts on: its ErrorInfo's reason and "applied", and the
// fields its BadRequest names.
function statusFields(error) {
  const [trailer] = error.metadata ? error.metadata.get("grpc-status-details-bin") : [];
  if (!trailer) return null;
  const status = Status.decode(trailer);
  const fields = { code: status.code, reason: null, domain: null, applied: null, bad_fields: [] };
  for (const detail of status.details) {
    const type = rpcProtos.lookupType(detail.type_url.split("/").pop());
    const message = type.decode(detail.value);
    if (type.fullName === ".google.rpc.ErrorInfo") {
      fields.reason = message.reason;
      fields.domain = message.domain;
      fields.applied = message.metadata.applied;
    } else if (type.fullName === ".google.rpc.BadRequest") {
      fields.bad_fields = message.fieldViolations.map((violation) => violation.field);
    }
  }
  return fields;
}

// One Pipeline batch, answered: its results (proto-loader gives enums by name).
function pipeline(operations) {
  return new Promise((resolve, reject) => {
    const stream = client.Pipeline({ deadline: Date.now() + 15000 });
    stream.on("data", (response) => {
      resolve(response.results);
      stream.end();
    });
    stream.on("error", reject);
    stream.write({ id: 1, operations });
  });
}

const SPREAD_KEYS = 16;
// Past 2**53 (9007199254740992): a JS Number cannot hold it, a decimal string can.
const BIG_AMOUNT = "9007199254740993";

class CallError extends Error {
  constructor(method, error) {
    super(`${method}: ${error.message}`);
    this.method = method;
    this.code = error.code;
    this.details = error.details;
    this.fields = statusFields(error);
  }
}

function call(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 15000 }, (error, response) =>
      error ? reject(new CallError(method, error)) : resolve(response),
    ),
  );
}

async function main() {
  const read = await call("Get", { path, key: "from-python" });
  const ttl = await call("ExpiresIn", { path, key: "from-python" });
  const spreadKeys = Array.from({ length: SPREAD_KEYS }, (_, i) => `spread-${i}`);
  for (const key of spreadKeys) {
    await call("Set", { path, key, value: Buffer.from(`${key} from node`) });
  }
  const spread = [];
  for (const key of spreadKeys) {
    const response = await call("Get", { path, key });
    spread.push(response.found ? Buffer.from(response.value).toString("utf8") : null);
  }
  await call("Set", {
    path,
    key: "from-node",
    value: Buffer.from("hello from node ✓"),
    expires_in: { seconds: 60, nanos: 0 },
  });
  const missing = await call("Get", { path: path.slice(0, -1), key: "from-python" });
  let invalid = null;
  try {
    await call("Set", { path: [path[0], ""], key: "k", value: Buffer.from("") });
  } catch (error) {
    invalid = { code: error.code, details: error.details, fields: error.fields };
  }
  // A counter made by the first increment, with a 60 s window the second one keeps.
  const counted = [];
  for (let i = 0; i < 2; i++) {
    const response = await call("Increment", {
      path,
      key: "counter-from-node",
      amount: 5,
      expires_in: { seconds: 60, nanos: 0 },
    });
    counted.push({
      value: response.value,
      version_bytes: Buffer.from(response.version).length,
      expires_in_seconds: response.expires_in ? Number(response.expires_in.seconds) : null,
    });
  }
  const big = await call("Increment", { path, key: "big-from-node", amount: BIG_AMOUNT });
  let notInteger = null;
  try {
    await call("Increment", { path, key: "from-python", amount: 1 });
  } catch (error) {
    notInteger = { code: error.code, details: error.details, fields: error.fields };
  }
  // The same refusal as one operation of a Pipeline: an OperationError, from store.proto alone.
  const [pipelined] = await pipeline([{ increment: { path, key: "from-python", amount: 1 } }]);
  const operationError = {
    code: pipelined.error.code,
    reason: pipelined.error.reason,
    applied: pipelined.error.applied,
  };
  console.log(
    JSON.stringify({
      found: read.found,
      value: Buffer.from(read.value).toString("utf8"),
      ttl_found: ttl.found,
      ttl_seconds: ttl.expires_in ? Number(ttl.expires_in.seconds) : null,
      spread,
      other_namespace_found: missing.found,
      invalid,
      counted,
      big: { value: big.value, expires_in: big.expires_in },
      not_integer: notInteger,
      operation_error: operationError,
    }),
  );
}

main()
  .catch((error) => {
    if (error instanceof CallError) {
      const { method, code, details, fields } = error;
      console.log(JSON.stringify({ error: { method, code, details, fields } }));
      process.exitCode = 2;
    } else {
      console.error(error);
      process.exitCode = 1;
    }
  })
  .finally(() => client.close());
