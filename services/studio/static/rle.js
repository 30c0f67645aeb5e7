// COCO compressed RLE, as pycocotools writes it (maskApi.c rleToString / rleFrString).
//
// A mask of size [H, W] is run-length encoded in column-major (Fortran) order: counts alternate
// runs of 0s and 1s, starting with 0s (a first run of length 0 when the mask starts with a 1).
// The counts string writes each run, minus the run two before it (for i > 2), as little-endian
// 5-bit chunks with a continuation bit (0x20) and a sign bit (0x10) in the last chunk, each chunk
// offset by 48 ('0') so the string is printable.
//
// The page works on row-major Uint8Array masks (index y * W + x, values 0/1), the layout of a canvas.

/** Run lengths (column-major) of a COCO counts string. */
export function countsFromString(s) {
  const runs = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= s.length) throw new Error("truncated RLE counts string");
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k); // sign-extend the last chunk
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  return runs;
}

/** The COCO counts string of run lengths (column-major). */
export function countsToString(runs) {
  let s = "";
  for (let i = 0; i < runs.length; i++) {
    let x = runs[i];
    if (i > 2) x -= runs[i - 2];
    let more = true;
    while (more) {
      let c = x & 0x1f; // two's complement low bits, also for negative x
      x = Math.floor(x / 32); // arithmetic shift right by 5 without the 32-bit limit of >>
      more = (c & 0x10) ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      s += String.fromCharCode(c + 48);
    }
  }
  return s;
}

function runsOf(rle) {
  const counts = rle.counts;
  if (typeof counts === "string") return countsFromString(counts);
  if (Array.isArray(counts)) return counts; // uncompressed RLE
  throw new Error("RLE counts must be a string or a list");
}

/**
 * Decode a COCO RLE {size: [H, W], counts} to a row-major Uint8Array(H * W) of 0/1.
 * Throws when the runs do not tile the image.
 */
export function decode(rle, out = null) {
  return decodeWithBox(rle, out).mask;
}

/**
 * decode(), and the mask's bounding box [x0, y0, x1, y1] (inclusive pixels; null when empty),
 * worked out from the runs in the same pass.
 */
export function decodeWithBox(rle, out = null) {
  const [h, w] = rle.size;
  const n = h * w;
  const runs = runsOf(rle);
  const mask = out || new Uint8Array(n);
  if (out) mask.fill(0);
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  let pos = 0; // column-major index
  for (let i = 0; i < runs.length; i++) {
    const len = runs[i];
    if (len < 0 || pos + len > n) throw new Error("RLE runs do not tile the image");
    if ((i & 1) && len > 0) {
      // a run of 1s from column-major pos: walk it column by column
      let col = Math.floor(pos / h);
      let row = pos - col * h;
      const lastCol = Math.floor((pos + len - 1) / h);
      const lastRow = pos + len - 1 - lastCol * h;
      if (col < x0) x0 = col;
      if (lastCol > x1) x1 = lastCol;
      const top = lastCol > col ? 0 : row;
      const bottom = lastCol > col ? h - 1 : lastRow;
      if (top < y0) y0 = top;
      if (bottom > y1) y1 = bottom;
      let left = len;
      while (left > 0) {
        const take = Math.min(left, h - row);
        let idx = row * w + col;
        for (let r = 0; r < take; r++, idx += w) mask[idx] = 1;
        left -= take;
        row = 0;
        col++;
      }
    }
    pos += len;
  }
  if (pos !== n) throw new Error("RLE runs do not tile the image");
  return { mask, box: x1 < 0 ? null : [x0, y0, x1, y1] };
}

/** Encode a row-major 0/1 mask of size H x W to COCO compressed RLE {size: [H, W], counts}. */
export function encode(mask, h, w) {
  if (mask.length !== h * w) throw new Error(`mask has ${mask.length} pixels, not ${h}x${w}`);
  const runs = [];
  let prev = 0;
  let run = 0;
  for (let x = 0; x < w; x++) {
    for (let idx = x; idx < h * w; idx += w) {
      const v = mask[idx] ? 1 : 0;
      if (v !== prev) {
        runs.push(run);
        run = 0;
        prev = v;
      }
      run++;
    }
  }
  runs.push(run);
  return { size: [h, w], counts: countsToString(runs) };
}

/** Pixel count of a row-major mask. */
export function area(mask) {
  let a = 0;
  for (let i = 0; i < mask.length; i++) a += mask[i] ? 1 : 0;
  return a;
}

/** COCO bbox [x, y, w, h] of a row-major mask (all zeros for an empty one). */
export function bbox(mask, h, w) {
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let y = 0; y < h; y++) {
    const row = y * w;
    for (let x = 0; x < w; x++) {
      if (mask[row + x]) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        y1 = y;
      }
    }
  }
  return x1 < 0 ? [0, 0, 0, 0] : [x0, y0, x1 - x0 + 1, y1 - y0 + 1];
}
