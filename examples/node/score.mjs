#!/usr/bin/env node
// Scores PNG images with a spade-ad single graph (`spade-ad export MODEL --single-graph -o GRAPH.onnx`) in Node.js:
// no Python anywhere. Prints one JSON line per image: {"file", "score", "is_anomalous", "normalized_score", "ms"}.
//
//   npm install --ignore-scripts          (once, in this folder: onnxruntime-node and pngjs)
//   node score.mjs GRAPH.onnx IMAGE.png... [--maps DIR]
//
// --maps DIR also writes each image's anomaly map (float32, the network input's size) as DIR/NNNN.npy and names it
// in the line ("map"). The graph's contract (inputs, outputs, resize) is in its metadata entry "spade_ad"
// (docs/single-graph.md). The image is decoded and resized here exactly as spade-ad does it in Python (Pillow's
// bilinear resampling with antialiasing, in Pillow's fixed-point arithmetic), so the scores are the Python path's.
// Exit status: 0 when every image was scored, 1 when some could not be (their lines carry "error"), 2 on usage errors.

import fs from "node:fs";
import path from "node:path";
import process from "node:process";
import url from "node:url";
import * as ort from "onnxruntime-node";
import pngjs from "pngjs";

const METADATA_KEY = "spade_ad";

function usage(message) {
  process.stderr.write(`error: ${message}\nusage: node score.mjs GRAPH.onnx IMAGE.png... [--maps DIR]\n`);
  process.exit(2);
}

// ---------------------------------------------------------------- the contract in the ONNX file's metadata

function readVarint(bytes, position) {
  let value = 0;
  let factor = 1;
  for (;;) {
    const byte = bytes[position++];
    if (byte === undefined) throw new Error("truncated protobuf varint");
    value += (byte & 0x7f) * factor;
    if (byte < 0x80) return [value, position];
    factor *= 128;
  }
}

// ModelProto.metadata_props (field 14): StringStringEntryProto {key = 1, value = 2}. Only the top level is walked.
function onnxMetadata(bytes) {
  const entries = {};
  let position = 0;
  while (position < bytes.length) {
    let key;
    [key, position] = readVarint(bytes, position);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) {
      [, position] = readVarint(bytes, position);
    } else if (wire === 1) {
      position += 8;
    } else if (wire === 5) {
      position += 4;
    } else if (wire === 2) {
      let length;
      [length, position] = readVarint(bytes, position);
      if (field === 14) {
        const entry = bytes.subarray(position, position + length);
        const strings = {};
        let inner = 0;
        while (inner < entry.length) {
          let innerKey, innerLength;
          [innerKey, inner] = readVarint(entry, inner);
          [innerLength, inner] = readVarint(entry, inner);
          strings[innerKey >> 3] = Buffer.from(entry.subarray(inner, inner + innerLength)).toString("utf8");
          inner += innerLength;
        }
        entries[strings[1]] = strings[2];
      }
      position += length;
    } else {
      throw new Error(`unexpected protobuf wire type ${wire}`);
    }
  }
  return entries;
}

// ---------------------------------------------------------------- decoding (as spade_ad.data.images: 8-bit RGB)

function readPng(file) {
  const png = pngjs.PNG.sync.read(fs.readFileSync(file), { skipRescale: true });
  const { width, height, data, depth, colorType } = png;
  const rgb = new Uint8Array(width * height * 3);
  // 16-bit samples keep their high byte (65535 -> 255), as Pillow and spade_ad.data.images do; 1/2/4-bit grey is
  // stretched to 0..255; alpha is dropped.
  const convert = depth === 16 ? (v) => v >> 8
    : depth < 8 && colorType !== 3 ? (v) => Math.round((v * 255) / (2 ** depth - 1)) : (v) => v;
  for (let i = 0, j = 0; i < width * height * 4; i += 4, j += 3) {
    rgb[j] = convert(data[i]);
    rgb[j + 1] = convert(data[i + 1]);
    rgb[j + 2] = convert(data[i + 2]);
  }
  return { width, height, rgb };
}

// ---------------------------------------------------------------- geometry (spade_ad.core.geometry.plan_geometry)

function roundHalfEven(value) {
  const floor = Math.floor(value);
  const difference = value - floor;
  if (difference > 0.5) return floor + 1;
  if (difference < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

function roundMultiple(value) {
  return Math.max(32, roundHalfEven(value / 32) * 32);
}

// {inputSize: [h, w], box: [left, top, right, bottom]} of an image of (height, width).
function planGeometry(height, width, imageSize, resize) {
  if (resize === "keep_aspect") {
    const scale = imageSize / Math.min(height, width);
    return { inputSize: [roundMultiple(height * scale), roundMultiple(width * scale)], box: [0, 0, width, height] };
  }
  if (resize === "squash") return { inputSize: [imageSize, imageSize], box: [0, 0, width, height] };
  if (resize === "paper_crop") {
    const resized = roundHalfEven((imageSize * 8) / 7);
    const margin = (resized - imageSize) / 2 / resized;
    return {
      inputSize: [imageSize, imageSize],
      box: [margin * width, margin * height, (1 - margin) * width, (1 - margin) * height],
    };
  }
  throw new Error(`unknown resize mode ${resize}`);
}

// ---------------------------------------------------------------- Pillow's BILINEAR resize, 8 bits per sample

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;

function bilinear(x) {
  const a = x < 0 ? -x : x;
  return a < 1 ? 1 - a : 0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc: box edges are C floats, the rest doubles, weights fixed-point.
function coefficients(inSize, in0, in1, outSize) {
  const start = Math.fround(in0);
  const scale = Math.fround(Math.fround(in1) - start) / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = start + (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    const k = new Float64Array(xmax);
    for (let x = 0; x < xmax; x++) {
      k[x] = bilinear((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? k[x] / ww : k[x];
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * ONE) : Math.trunc(0.5 + w * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, weights };
}

function clip8(sum) {
  const value = Math.floor(sum / ONE);
  return value < 0 ? 0 : value > 255 ? 255 : value;
}

// Pillow's ImagingResampleInner for RGB: horizontal pass over the rows the vertical pass needs, then vertical.
function resize(image, outWidth, outHeight, box) {
  const [left, top, right, bottom] = box.map(Math.fround);
  const needHorizontal = outWidth !== image.width || left !== 0 || right !== outWidth;
  const needVertical = outHeight !== image.height || top !== 0 || bottom !== outHeight;
  const vertical = coefficients(image.height, top, bottom, outHeight);
  const firstRow = vertical.bounds[0];
  const lastRow = vertical.bounds[outHeight * 2 - 2] + vertical.bounds[outHeight * 2 - 1];
  let source = image;
  if (needHorizontal) {
    const horizontal = coefficients(image.width, left, right, outWidth);
    const rows = lastRow - firstRow;
    const temp = new Uint8Array(outWidth * rows * 3);
    for (let yy = 0; yy < rows; yy++) {
      const rowStart = (yy + firstRow) * image.width * 3;
      for (let xx = 0; xx < outWidth; xx++) {
        const xmin = horizontal.bounds[xx * 2];
        const xmax = horizontal.bounds[xx * 2 + 1];
        const k = xx * horizontal.ksize;
        let s0 = ONE / 2, s1 = ONE / 2, s2 = ONE / 2;
        for (let x = 0; x < xmax; x++) {
          const w = horizontal.weights[k + x];
          const p = rowStart + (x + xmin) * 3;
          s0 += image.rgb[p] * w;
          s1 += image.rgb[p + 1] * w;
          s2 += image.rgb[p + 2] * w;
        }
        const o = (yy * outWidth + xx) * 3;
        temp[o] = clip8(s0);
        temp[o + 1] = clip8(s1);
        temp[o + 2] = clip8(s2);
      }
    }
    for (let i = 0; i < outHeight; i++) vertical.bounds[i * 2] -= firstRow;
    source = { width: outWidth, height: rows, rgb: temp };
  }
  if (!needVertical) return source.rgb;
  const out = new Uint8Array(source.width * outHeight * 3);
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = vertical.bounds[yy * 2];
    const ymax = vertical.bounds[yy * 2 + 1];
    const k = yy * vertical.ksize;
    for (let xx = 0; xx < source.width; xx++) {
      let s0 = ONE / 2, s1 = ONE / 2, s2 = ONE / 2;
      for (let y = 0; y < ymax; y++) {
        const w = vertical.weights[k + y];
        const p = ((y + ymin) * source.width + xx) * 3;
        s0 += source.rgb[p] * w;
        s1 += source.rgb[p + 1] * w;
        s2 += source.rgb[p + 2] * w;
      }
      const o = (yy * source.width + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

// ---------------------------------------------------------------- maps as .npy (numpy's format 1.0)

function writeNpy(file, values, shape) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(", ")}), }`;
  const unpadded = 10 + header.length + 1;
  header += " ".repeat((64 - (unpadded % 64)) % 64) + "\n";
  const prefix = Buffer.alloc(10);
  prefix.write("\x93NUMPY", 0, "latin1");
  prefix[6] = 1;
  prefix[7] = 0;
  prefix.writeUInt16LE(header.length, 8);
  const body = Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  fs.writeFileSync(file, Buffer.concat([prefix, Buffer.from(header, "latin1"), body]));
}

// ---------------------------------------------------------------- main

async function main() {
  const args = process.argv.slice(2);
  let mapsDir = null;
  const positional = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--maps") {
      mapsDir = args[++i];
      if (!mapsDir) usage("--maps needs a folder");
    } else {
      positional.push(args[i]);
    }
  }
  const [graphPath, ...images] = positional;
  if (!graphPath || images.length === 0) usage("give a graph and at least one image");
  if (!fs.existsSync(graphPath)) usage(`${graphPath} does not exist: export one with spade-ad export MODEL --single-graph -o ${graphPath}`);
  const bytes = fs.readFileSync(graphPath);
  let contract;
  try {
    contract = JSON.parse(onnxMetadata(bytes)[METADATA_KEY]);
  } catch {
    usage(`${graphPath} is not a spade-ad single graph (no "${METADATA_KEY}" metadata): export one with --single-graph`);
  }
  if (mapsDir) fs.mkdirSync(mapsDir, { recursive: true });
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["cpu"] });
  const [height, width] = contract.input_size;
  const needsGlobal = contract.inputs.some((input) => input.name === "global_image");
  const hasThreshold = contract.image_threshold !== null && contract.image_threshold !== undefined;
  let failed = 0;
  for (let index = 0; index < images.length; index++) {
    const file = images[index];
    const started = process.hrtime.bigint();
    let line;
    try {
      const image = readPng(file);
      const geometry = planGeometry(image.height, image.width, contract.image_size, contract.resize);
      if (geometry.inputSize[0] !== height || geometry.inputSize[1] !== width) {
        throw new Error(`a ${image.width} x ${image.height} image needs a ${geometry.inputSize[1]} x ` +
          `${geometry.inputSize[0]} network input; this graph takes ${width} x ${height} (the training images')`);
      }
      const feeds = { image: new ort.Tensor("uint8", resize(image, width, height, geometry.box), [1, height, width, 3]) };
      if (needsGlobal) {
        const side = contract.image_size;
        feeds.global_image = new ort.Tensor("uint8", resize(image, side, side, geometry.box), [1, side, side, 3]);
      }
      const out = await session.run(feeds);
      const score = Number(out.score.data[0]);
      line = {
        file, score, is_anomalous: hasThreshold ? Boolean(out.is_anomalous.data[0]) : null,
        normalized_score: hasThreshold ? Number(out.normalized_score.data[0]) : null,
      };
      if (mapsDir) {
        line.map = path.join(mapsDir, `${String(index).padStart(4, "0")}.npy`);
        writeNpy(line.map, out.anomaly_map.data, [height, width]);
      }
      line.ms = Number(process.hrtime.bigint() - started) / 1e6;
    } catch (error) {
      failed += 1;
      line = { file, error: String(error.message || error).split("\n")[0] };
    }
    process.stdout.write(JSON.stringify(line) + "\n");
  }
  process.exitCode = failed ? 1 : 0;
}

export { planGeometry, readPng, resize };

if (process.argv[1] && import.meta.url === url.pathToFileURL(path.resolve(process.argv[1])).href) {
  main().catch((error) => {
    process.stderr.write(`error: ${String(error.message || error).split("\n")[0]}\n`);
    process.exit(1);
  });
}
