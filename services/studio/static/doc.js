// The annotator's work on one item: phrases and masks, every edit undoable, saved in localStorage.
//
// A Doc holds immutable snapshots: an edit builds new phrase/mask objects and shares the rest, so
// undo/redo is a pointer move. A mask keeps its COCO RLE and/or its row-major bits (decoded and
// encoded lazily, and cached on the object, which never changes after it is made).

import * as rle from "./rle.js";

const PALETTE = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40],
  [255, 225, 25], [128, 0, 0], [170, 255, 195], [128, 128, 0], [0, 0, 128], [255, 215, 180],
];

let nextKey = 1;
const newKey = (prefix) => `${prefix}${nextKey++}`;

export function makeMask(fields) {
  return Object.freeze({
    key: fields.key || newKey("m"),
    rle: fields.rle || null,
    bits: fields.bits || null,
    decision: fields.decision || "accept",
    origin: fields.origin || "human",
    predicted_iou: fields.predicted_iou ?? null,
    stability_score: fields.stability_score ?? null,
    point_coords: fields.point_coords || [],
    mv_score: fields.mv_score ?? null,
    mv_choice: fields.mv_choice ?? null,
    proposed: !!fields.proposed, // came with the item (a model mask), as opposed to made here
  });
}

const bitsCache = new WeakMap();
const boxCache = new WeakMap();
const rleCache = new WeakMap();
const areaCache = new WeakMap();

/** The mask's row-major 0/1 pixels (decoded once). */
export function maskBits(mask, h, w) {
  if (mask.bits) return mask.bits;
  let bits = bitsCache.get(mask);
  if (!bits) {
    const { mask: decoded, box } = rle.decodeWithBox(mask.rle);
    if (decoded.length !== h * w) throw new Error("mask size differs from the image");
    bits = decoded;
    bitsCache.set(mask, bits);
    boxCache.set(mask, box);
  }
  return bits;
}

/** The mask's pixel bounds [x0, y0, x1, y1] (inclusive), null when empty. */
export function maskBox(mask, h, w) {
  if (boxCache.has(mask)) return boxCache.get(mask);
  const bits = maskBits(mask, h, w);
  if (boxCache.has(mask)) return boxCache.get(mask);
  const [x, y, bw, bh] = rle.bbox(bits, h, w);
  const box = bw ? [x, y, x + bw - 1, y + bh - 1] : null;
  boxCache.set(mask, box);
  return box;
}

/** The mask's COCO RLE (encoded once). */
export function maskRle(mask, h, w) {
  if (mask.rle) return mask.rle;
  let r = rleCache.get(mask);
  if (!r) {
    r = rle.encode(mask.bits, h, w);
    rleCache.set(mask, r);
  }
  return r;
}

export function maskArea(mask, h, w) {
  let a = areaCache.get(mask);
  if (a === undefined) {
    a = rle.area(maskBits(mask, h, w));
    areaCache.set(mask, a);
  }
  return a;
}

function makePhrase(fields, colorIndex) {
  return Object.freeze({
    key: fields.key || newKey("p"),
    phrase: fields.phrase,
    original_phrase: fields.original_phrase ?? null,
    is_negative: !!fields.is_negative,
    proposed_negative: !!fields.proposed_negative, // a hard negative the item came with
    exhaustive: fields.exhaustive ?? null,
    ungroundable: !!fields.ungroundable,
    negative_check: fields.negative_check ?? null,
    visible: fields.visible ?? true,
    color: fields.color || PALETTE[colorIndex % PALETTE.length],
    meta: fields.meta || null, // the verifier's figures, read-only
    masks: Object.freeze(fields.masks || []),
  });
}

function phraseFromView(p, i) {
  const meta = {
    score: p.score ?? null, ev_score: p.ev_score ?? null, ev_choice: p.ev_choice ?? null,
    state: p.state ?? null, provenance: p.provenance ?? null, grounded: p.grounded ?? null,
    verdicts: p.verdicts || [],
  };
  const masks = (p.masks || []).map((m) => makeMask({
    rle: m.rle, decision: "accept", origin: "model", predicted_iou: m.predicted_iou,
    stability_score: m.stability_score, point_coords: m.point_coords || [], mv_score: m.mv_score,
    mv_choice: m.mv_choice, proposed: true,
  }));
  return makePhrase({
    phrase: p.phrase, original_phrase: p.phrase, is_negative: p.is_negative,
    proposed_negative: p.is_negative, meta, masks,
  }, i);
}

export class Doc {
  /** A fresh doc from an item view (or from saved work, see Doc.restore). */
  constructor(view, phrases = null) {
    this.view = view;
    this.h = view.height;
    this.w = view.width;
    this.past = [];
    this.future = [];
    this.present = Object.freeze(phrases || view.phrases.map(phraseFromView));
    this.colorCount = this.present.length;
    this.listeners = [];
  }

  get phrases() { return this.present; }

  onChange(fn) { this.listeners.push(fn); }

  emit() { for (const fn of this.listeners) fn(this); }

  phrase(key) { return this.present.find((p) => p.key === key) || null; }

  findMask(maskKey) {
    for (const p of this.present) {
      const m = p.masks.find((x) => x.key === maskKey);
      if (m) return { phrase: p, mask: m };
    }
    return null;
  }

  commit(phrases, label) {
    this.past.push({ phrases: this.present, label });
    if (this.past.length > 300) this.past.shift();
    this.future = [];
    this.present = Object.freeze(phrases);
    this.lastLabel = label;
    this.emit();
  }

  canUndo() { return this.past.length > 0; }
  canRedo() { return this.future.length > 0; }

  undo() {
    const prev = this.past.pop();
    if (!prev) return null;
    this.future.push({ phrases: this.present, label: prev.label });
    this.present = prev.phrases;
    this.emit();
    return prev.label;
  }

  redo() {
    const next = this.future.pop();
    if (!next) return null;
    this.past.push({ phrases: this.present, label: next.label });
    this.present = next.phrases;
    this.emit();
    return next.label;
  }

  updatePhrase(key, fn, label) {
    const phrases = this.present.map((p) => (p.key === key ? makePhrase({ ...p, ...fn(p) }) : p));
    this.commit(phrases, label);
  }

  // ---- edits (each one undoable) ----
  setMaskDecision(maskKey, decision) {
    const found = this.findMask(maskKey);
    if (!found || found.mask.decision === decision) return;
    this.updatePhrase(found.phrase.key, (p) => ({
      masks: p.masks.map((m) => (m.key === maskKey ? makeMask({ ...m, decision }) : m)),
    }), `${decision} mask`);
  }

  deleteMask(maskKey) {
    const found = this.findMask(maskKey);
    if (!found) return;
    this.updatePhrase(found.phrase.key, (p) => ({ masks: p.masks.filter((m) => m.key !== maskKey) }),
      "delete mask");
  }

  addMask(phraseKey, fields, label = "add mask") {
    const mask = makeMask(fields);
    this.updatePhrase(phraseKey, (p) => ({ masks: [...p.masks, mask] }), label);
    return mask;
  }

  /** Replace a mask's pixels (brush/eraser): an edited model mask becomes origin "human". */
  paintMask(maskKey, bits, label) {
    const found = this.findMask(maskKey);
    if (!found) return null;
    const mask = makeMask({ ...found.mask, key: found.mask.key, bits, rle: null, origin: "human" });
    this.updatePhrase(found.phrase.key, (p) => ({
      masks: p.masks.map((m) => (m.key === maskKey ? mask : m)),
    }), label);
    return mask;
  }

  addPhrase(name, isNegative = false) {
    const phrase = makePhrase({ phrase: name, original_phrase: null, is_negative: isNegative },
      this.colorCount++);
    this.commit([...this.present, phrase], isNegative ? "add hard negative" : "add phrase");
    return phrase;
  }

  removePhrase(key) {
    this.commit(this.present.filter((p) => p.key !== key), "remove phrase");
  }

  renamePhrase(key, name) {
    const p = this.phrase(key);
    if (!p || p.phrase === name) return;
    this.updatePhrase(key, () => ({ phrase: name }), "rename phrase");
  }

  setExhaustive(key, value) {
    this.updatePhrase(key, () => ({ exhaustive: value }), "exhaustivity");
  }

  setUngroundable(key, value) {
    this.updatePhrase(key, () => ({ ungroundable: value }), value ? "ungroundable" : "groundable");
  }

  /** A proposed hard negative: "absent" (confirmed), "present" (a positive to mask) or null. */
  setNegativeCheck(key, check) {
    const p = this.phrase(key);
    if (!p) return;
    const isNegative = check === "present" ? false : (p.proposed_negative || p.is_negative);
    this.updatePhrase(key, () => ({ negative_check: check, is_negative: isNegative }),
      check === "present" ? "hard negative present" : check === "absent" ? "hard negative absent" : "undecided");
  }

  setVisible(key, visible) { // a view setting, not an edit: no history
    this.present = Object.freeze(this.present.map((p) => (p.key === key ? makePhrase({ ...p, visible }) : p)));
    this.emit();
  }

  setAllVisible(visible) {
    this.present = Object.freeze(this.present.map((p) => makePhrase({ ...p, visible })));
    this.emit();
  }

  // ---- out ----
  /** The body's phrases for POST /api/items/{id}/submit. */
  submitPhrases() {
    return this.present.map((p) => {
      const out = {
        phrase: p.phrase, original_phrase: p.original_phrase, is_negative: p.is_negative,
        exhaustive: p.is_negative ? null : p.exhaustive, ungroundable: p.ungroundable,
        negative_check: p.negative_check,
        masks: p.is_negative ? [] : p.masks.map((m) => {
          const mo = { rle: maskRle(m, this.h, this.w), decision: m.decision, origin: m.origin,
            point_coords: m.point_coords || [] };
          if (m.predicted_iou != null) mo.predicted_iou = m.predicted_iou;
          if (m.stability_score != null) mo.stability_score = m.stability_score;
          return mo;
        }),
      };
      return out;
    });
  }

  /** JSON-able work to keep in localStorage (masks as RLE). */
  serialize() {
    return this.present.map((p) => ({
      ...p,
      masks: p.masks.map((m) => ({ ...m, bits: null, rle: maskRle(m, this.h, this.w) })),
    }));
  }

  static restore(view, saved) {
    const phrases = saved.map((p, i) => makePhrase({ ...p, key: undefined,
      masks: p.masks.map((m) => makeMask({ ...m, key: undefined })) }, i));
    return new Doc(view, phrases);
  }
}

// ---- work kept in the browser ----
const WORK_PREFIX = "studio.work.";

export function workKey(annotator, itemId) { return `${WORK_PREFIX}${annotator}.${itemId}`; }

export function saveWork(annotator, doc, extra = {}) {
  const record = { item_id: doc.view.item_id, annotator, saved_at: Date.now(), view: doc.view,
    phrases: doc.serialize(), ...extra };
  try {
    localStorage.setItem(workKey(annotator, doc.view.item_id), JSON.stringify(record));
    return true;
  } catch (e) {
    console.warn("cannot keep the work in localStorage", e);
    return false;
  }
}

export function loadWork(annotator, itemId) {
  const s = localStorage.getItem(workKey(annotator, itemId));
  if (!s) return null;
  try { return JSON.parse(s); } catch (_) { return null; }
}

export function dropWork(annotator, itemId) {
  localStorage.removeItem(workKey(annotator, itemId));
}

export function keptWork(annotator) {
  const out = [];
  for (let i = 0; i < localStorage.length; i++) {
    const k = localStorage.key(i);
    if (k && k.startsWith(`${WORK_PREFIX}${annotator}.`)) out.push(k.slice(`${WORK_PREFIX}${annotator}.`.length));
  }
  return out;
}

/** Forget kept work older than maxDays (items long since done by someone else). */
export function pruneWork(maxDays = 14) {
  const cutoff = Date.now() - maxDays * 86400e3;
  const old = [];
  for (let i = 0; i < localStorage.length; i++) {
    const k = localStorage.key(i);
    if (!k || !k.startsWith(WORK_PREFIX)) continue;
    try {
      if ((JSON.parse(localStorage.getItem(k)).saved_at || 0) < cutoff) old.push(k);
    } catch (_) { old.push(k); }
  }
  for (const k of old) localStorage.removeItem(k);
}
