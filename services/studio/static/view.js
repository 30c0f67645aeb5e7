// The canvas: the image, the masks as coloured overlays, the prompt (points, box), the candidate
// and the brush; zoom (wheel), pan (middle drag or Space + drag), and the pointer tools.

import { maskBits, maskBox } from "./doc.js";

/** A box [x0, y0, x1, y1] grown by one pixel (the edge test reads neighbours), in the image; null stays null. */
function grown(box, w, h) {
  if (!box) return null;
  return [Math.max(0, box[0] - 1), Math.max(0, box[1] - 1), Math.min(w - 1, box[2] + 1), Math.min(h - 1, box[3] + 1)];
}

const INTERIOR_ALPHA = 180; // overlay interior; the edge is opaque (the opacity slider scales both)

/**
 * An overlay canvas of one mask in one colour, whose pixels can be repainted by rectangles.
 * `box` [x0, y0, x1, y1] (inclusive) bounds the mask's pixels: only that part is painted and drawn
 * (null: an empty mask; it grows as a brush paints).
 */
export class Overlay {
  constructor(bits, w, h, color, box = [0, 0, w - 1, h - 1]) {
    this.bits = bits;
    this.w = w;
    this.h = h;
    this.color = color;
    this.canvas = document.createElement("canvas");
    this.canvas.width = w;
    this.canvas.height = h;
    this.ctx = this.canvas.getContext("2d");
    this.image = this.ctx.createImageData(w, h);
    this.px = new Uint32Array(this.image.data.buffer);
    const [r, g, b] = color;
    // ImageData is RGBA in memory; a little-endian Uint32 reads it as ABGR
    this.edge = (255 << 24) | (b << 16) | (g << 8) | r;
    this.fill = (INTERIOR_ALPHA << 24) | (b << 16) | (g << 8) | r;
    this.box = null;
    if (box) this.paint(box[0], box[1], box[2], box[3]);
  }

  /** Repaint pixels in [x0, x1] x [y0, y1] from the bits (edges: a 4-neighbour outside the mask). */
  paint(x0, y0, x1, y1) {
    const { bits, w, h, px, edge, fill } = this;
    x0 = Math.max(0, Math.floor(x0)); y0 = Math.max(0, Math.floor(y0));
    x1 = Math.min(w - 1, Math.ceil(x1)); y1 = Math.min(h - 1, Math.ceil(y1));
    if (x1 < x0 || y1 < y0) return;
    for (let y = y0; y <= y1; y++) {
      let i = y * w + x0;
      const edgeRow = y === 0 || y === h - 1;
      for (let x = x0; x <= x1; x++, i++) {
        if (!bits[i]) { px[i] = 0; continue; }
        const border = edgeRow || x === 0 || x === w - 1 ||
          !bits[i - 1] || !bits[i + 1] || !bits[i - w] || !bits[i + w];
        px[i] = border ? edge : fill;
      }
    }
    this.ctx.putImageData(this.image, 0, 0, x0, y0, x1 - x0 + 1, y1 - y0 + 1);
    const b = this.box;
    this.box = b ? [Math.min(b[0], x0), Math.min(b[1], y0), Math.max(b[2], x1), Math.max(b[3], y1)] : [x0, y0, x1, y1];
  }

  /** Draw the painted part onto ctx (image coordinates). */
  drawOn(ctx) {
    const b = this.box;
    if (!b) return;
    const bw = b[2] - b[0] + 1, bh = b[3] - b[1] + 1;
    ctx.drawImage(this.canvas, b[0], b[1], bw, bh, b[0], b[1], bw, bh);
  }
}

export class View {
  constructor(canvas, callbacks) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.cb = callbacks; // {point(x, y, label), box(box), strokeStart(x, y), strokeMove(x, y), strokeEnd(), pick(x, y), cursor(x, y)}
    this.image = null;
    this.doc = null;
    this.w = 0;
    this.h = 0;
    this.scale = 1;
    this.ox = 0;
    this.oy = 0;
    this.opacity = 0.6;
    this.tool = "point";
    this.brushRadius = 8;
    this.selectedMask = null;
    this.prompt = { points: [], box: null };
    this.candidate = null; // {bits, key} shown over everything
    this.dragBox = null;
    this.overlays = new WeakMap(); // mask object -> Overlay
    this.cursor = null; // image coords of the pointer
    this.spaceDown = false;
    this.pan = null;
    this.stroke = null;
    this.pending = false;
    this.bind();
    new ResizeObserver(() => this.resize()).observe(canvas.parentElement);
    this.resize();
  }

  // ---- content ----
  setItem(image, doc) {
    this.image = image;
    this.doc = doc;
    this.w = doc ? doc.w : 0;
    this.h = doc ? doc.h : 0;
    this.overlays = new WeakMap();
    this.layerKey = null;
    this.candidate = null;
    this.selectedMask = null;
    this.prompt = { points: [], box: null };
    this.fit();
  }

  overlayFor(mask, color) {
    let ov = this.overlays.get(mask);
    if (!ov || ov.color !== color) {
      const bits = maskBits(mask, this.h, this.w);
      ov = new Overlay(bits, this.w, this.h, color, grown(maskBox(mask, this.h, this.w), this.w, this.h));
      this.overlays.set(mask, ov);
    }
    return ov;
  }

  /** An overlay for working bits (a brush stroke, a candidate), tied to a key object. */
  liveOverlay(keyObj, bits, color, box = undefined) {
    const ov = new Overlay(bits, this.w, this.h, color, box === undefined ? [0, 0, this.w - 1, this.h - 1]
      : grown(box, this.w, this.h));
    this.overlays.set(keyObj, ov);
    return ov;
  }

  /**
   * The masks composited once into an image-sized layer, redrawn only when the doc, the selection,
   * the opacity or the stroke changes: a draw costs the image, this layer and the candidate.
   */
  masksLayer() {
    const key = this.layerKey;
    const strokeKey = this.stroke ? this.stroke.maskKey : null;
    if (key && key.phrases === this.doc.phrases && key.selected === this.selectedMask &&
        key.opacity === this.opacity && key.stroke === strokeKey && this.layer.width === this.w &&
        this.layer.height === this.h) return this.layer;
    if (!this.layer) this.layer = document.createElement("canvas");
    const layer = this.layer;
    if (layer.width !== this.w || layer.height !== this.h) { layer.width = this.w; layer.height = this.h; }
    const ctx = layer.getContext("2d");
    ctx.clearRect(0, 0, this.w, this.h);
    let selected = null;
    for (const p of this.doc.phrases) {
      if (!p.visible || p.is_negative) continue;
      for (const m of p.masks) {
        if (m.key === strokeKey) continue; // drawn live over the layer
        const ov = this.overlayFor(m, p.color);
        if (m.key === this.selectedMask) { selected = { m, ov }; continue; }
        ctx.globalAlpha = this.opacity * (m.decision === "reject" ? 0.3 : 1);
        ov.drawOn(ctx);
      }
    }
    if (selected) { // the selected mask over the others, more opaque
      ctx.globalAlpha = Math.min(1, this.opacity + 0.3) * (selected.m.decision === "reject" ? 0.5 : 1);
      selected.ov.drawOn(ctx);
    }
    ctx.globalAlpha = 1;
    this.layerKey = { phrases: this.doc.phrases, selected: this.selectedMask, opacity: this.opacity, stroke: strokeKey };
    return layer;
  }

  // ---- geometry ----
  resize() {
    const parent = this.canvas.parentElement;
    const dpr = window.devicePixelRatio || 1;
    const cw = Math.max(1, parent.clientWidth);
    const ch = Math.max(1, parent.clientHeight);
    this.cssW = cw;
    this.cssH = ch;
    this.canvas.width = Math.round(cw * dpr);
    this.canvas.height = Math.round(ch * dpr);
    this.canvas.style.width = `${cw}px`;
    this.canvas.style.height = `${ch}px`;
    if (!this.fitted) this.fit();
    else this.draw();
  }

  fit() {
    if (!this.w) { this.draw(); return; }
    const s = Math.min(this.cssW / this.w, this.cssH / this.h) * 0.96;
    this.scale = s;
    this.ox = (this.cssW - this.w * s) / 2;
    this.oy = (this.cssH - this.h * s) / 2;
    this.fitted = true;
    this.draw();
  }

  zoomAt(cx, cy, factor) {
    const s = Math.min(64, Math.max(0.05, this.scale * factor));
    const ix = (cx - this.ox) / this.scale;
    const iy = (cy - this.oy) / this.scale;
    this.scale = s;
    this.ox = cx - ix * s;
    this.oy = cy - iy * s;
    this.draw();
  }

  /** Image pixel coordinates of a pointer event. */
  toImage(ev) {
    const r = this.canvas.getBoundingClientRect();
    return { x: (ev.clientX - r.left - this.ox) / this.scale, y: (ev.clientY - r.top - this.oy) / this.scale };
  }

  /** Client (page) coordinates of an image point: for tests and scripted sessions. */
  toClient(x, y) {
    const r = this.canvas.getBoundingClientRect();
    return { x: r.left + this.ox + x * this.scale, y: r.top + this.oy + y * this.scale };
  }

  inside(p) { return p.x >= 0 && p.y >= 0 && p.x < this.w && p.y < this.h; }

  // ---- drawing ----
  draw() {
    const { ctx, canvas } = this;
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!this.image || !this.doc) return;
    ctx.setTransform(dpr * this.scale, 0, 0, dpr * this.scale, dpr * this.ox, dpr * this.oy);
    ctx.imageSmoothingEnabled = this.scale < 2;
    ctx.drawImage(this.image, 0, 0, this.w, this.h);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.masksLayer(), 0, 0);
    if (this.stroke && this.stroke.overlay) {
      ctx.globalAlpha = Math.min(1, this.opacity + 0.3);
      this.stroke.overlay.drawOn(ctx);
    }
    if (this.candidate) {
      ctx.globalAlpha = Math.min(1, this.opacity + 0.2);
      this.candidate.overlay.drawOn(ctx);
    }
    ctx.globalAlpha = 1;
    // screen-space marks
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const box = this.dragBox || this.prompt.box;
    if (box) {
      const a = this.screen(box.x0, box.y0);
      const b = this.screen(box.x1, box.y1);
      ctx.lineWidth = 2;
      ctx.setLineDash([6, 4]);
      ctx.strokeStyle = "#ffd400";
      ctx.strokeRect(a.x, a.y, b.x - a.x, b.y - a.y);
      ctx.setLineDash([]);
    }
    for (const pt of this.prompt.points) {
      const s = this.screen(pt.x, pt.y);
      ctx.beginPath();
      ctx.arc(s.x, s.y, 6, 0, 2 * Math.PI);
      ctx.fillStyle = pt.label ? "#22c55e" : "#ef4444";
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#fff";
      ctx.stroke();
      ctx.beginPath(); // + or -
      ctx.moveTo(s.x - 3, s.y); ctx.lineTo(s.x + 3, s.y);
      if (pt.label) { ctx.moveTo(s.x, s.y - 3); ctx.lineTo(s.x, s.y + 3); }
      ctx.stroke();
    }
    if ((this.tool === "brush" || this.tool === "eraser") && this.cursor) {
      const s = this.screen(this.cursor.x, this.cursor.y);
      ctx.beginPath();
      ctx.arc(s.x, s.y, Math.max(1, this.brushRadius * this.scale), 0, 2 * Math.PI);
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = this.tool === "brush" ? "#fff" : "#ff7b7b";
      ctx.setLineDash(this.tool === "eraser" ? [4, 3] : []);
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }

  screen(x, y) { return { x: this.ox + x * this.scale, y: this.oy + y * this.scale }; }

  /** Draw on the next animation frame (coalesced). */
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  // ---- pointer ----
  bind() {
    const c = this.canvas;
    c.addEventListener("contextmenu", (ev) => ev.preventDefault());
    c.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const r = c.getBoundingClientRect();
      this.zoomAt(ev.clientX - r.left, ev.clientY - r.top, Math.exp(-ev.deltaY * 0.0015));
    }, { passive: false });
    c.addEventListener("pointerdown", (ev) => this.down(ev));
    c.addEventListener("pointermove", (ev) => this.move(ev));
    c.addEventListener("pointerup", (ev) => this.up(ev));
    c.addEventListener("pointerleave", () => { this.cursor = null; this.schedule(); });
  }

  down(ev) {
    if (!this.doc) return;
    this.canvas.focus();
    if (ev.button === 1 || (ev.button === 0 && this.spaceDown)) {
      this.pan = { x: ev.clientX, y: ev.clientY, ox: this.ox, oy: this.oy };
      this.canvas.setPointerCapture(ev.pointerId);
      ev.preventDefault();
      return;
    }
    const p = this.toImage(ev);
    if (!this.inside(p)) return;
    const px = { x: Math.round(p.x * 10) / 10, y: Math.round(p.y * 10) / 10 };
    if (this.tool === "box" && ev.button === 0 && !ev.shiftKey) {
      this.dragBox = { x0: px.x, y0: px.y, x1: px.x, y1: px.y };
      this.canvas.setPointerCapture(ev.pointerId);
      return;
    }
    if (this.tool === "brush" || this.tool === "eraser") {
      if (ev.button !== 0) return;
      if (this.cb.strokeStart(p.x, p.y, this.tool === "eraser" ? 0 : 1)) {
        this.canvas.setPointerCapture(ev.pointerId);
        this.stroking = true;
      }
      return;
    }
    if (this.tool === "select") {
      if (ev.button === 0) this.cb.pick(p.x, p.y);
      return;
    }
    // point tools; box tool with Shift or right click adds points too
    let label = this.tool === "negative" ? 0 : 1;
    if (ev.button === 2 || ev.shiftKey) label = 0;
    if (ev.button !== 0 && ev.button !== 2) return;
    this.cb.point(px.x, px.y, label, ev);
  }

  move(ev) {
    if (!this.doc) return;
    if (this.pan) {
      this.ox = this.pan.ox + ev.clientX - this.pan.x;
      this.oy = this.pan.oy + ev.clientY - this.pan.y;
      this.schedule();
      return;
    }
    const p = this.toImage(ev);
    this.cursor = p;
    if (this.dragBox) {
      this.dragBox.x1 = Math.min(this.w, Math.max(0, Math.round(p.x * 10) / 10));
      this.dragBox.y1 = Math.min(this.h, Math.max(0, Math.round(p.y * 10) / 10));
    }
    if (this.stroking) this.cb.strokeMove(p.x, p.y);
    if (this.cb.cursor) this.cb.cursor(p.x, p.y);
    this.schedule();
  }

  up(ev) {
    if (this.pan) { this.pan = null; return; }
    if (this.dragBox) {
      const b = this.dragBox;
      this.dragBox = null;
      const box = { x0: Math.min(b.x0, b.x1), y0: Math.min(b.y0, b.y1), x1: Math.max(b.x0, b.x1), y1: Math.max(b.y0, b.y1) };
      if (box.x1 - box.x0 >= 2 && box.y1 - box.y0 >= 2) this.cb.box(box);
      else this.schedule();
      return;
    }
    if (this.stroking) {
      this.stroking = false;
      this.cb.strokeEnd();
    }
  }
}
