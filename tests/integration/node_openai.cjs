// OpenAI's Node client against the gateway's HTTP API, every form issue 26 names.
// Run by tests/integration/test_node_openai.py: `node node_openai.cjs` with CLIP_BASE_URL,
// CLIP_IMAGE_B64 (a PNG, base64) and OPENAI_NODE_MODULE (the installed package's folder);
// prints one JSON object of what each call returned, for the Python side to check.
const OpenAI = require(process.env.OPENAI_NODE_MODULE);

async function refusal(promise) {
  try {
    await promise;
    return { status: 200 };
  } catch (err) {
    return { status: err.status, message: err.error ? err.error.message : String(err) };
  }
}

async function main() {
  const client = new OpenAI({ baseURL: process.env.CLIP_BASE_URL, apiKey: "unused" });
  const b64 = process.env.CLIP_IMAGE_B64;
  const dataUri = `data:image/png;base64,${b64}`;
  const vectors = (r) => r.data.map((d) => Array.from(d.embedding));
  const texts = ["a red circle", "a blue star"];
  const out = {};
  // The client asks for base64 by default and decodes it itself.
  const byDefault = await client.embeddings.create({ model: "clip", input: texts });
  out.default_texts = vectors(byDefault);
  out.default_model = byDefault.model;
  out.float_texts = vectors(
    await client.embeddings.create({ model: "clip", input: texts, encoding_format: "float" })
  );
  out.image_modality = vectors(
    await client.embeddings.create({ model: "clip", input: [dataUri], modality: "image" })
  );
  out.image_part = vectors(
    await client.embeddings.create({
      model: "clip",
      input: [{ type: "image_url", image_url: { url: dataUri } }],
    })
  );
  out.image_object = vectors(
    await client.embeddings.create({ model: "clip", input: [{ image: b64 }] })
  );
  out.retrieved = (await client.models.retrieve("clip")).id;
  out.listed = [];
  for await (const model of client.models.list()) out.listed.push(model.id);
  out.data_uri_as_text = await refusal(
    client.embeddings.create({ model: "clip", input: [dataUri] })
  );
  out.token_ids = await refusal(client.embeddings.create({ model: "clip", input: [[1, 2, 3]] }));
  out.unknown_model = await refusal(client.embeddings.create({ model: "nope", input: "x" }));
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
