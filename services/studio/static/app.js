// The annotation studio page: sign in, claim items, verify and fix masks, phrases and hard
// negatives, add masks by clicks (SAM predict) or brush, submit. See services/studio/API.md.

import { api, ApiError, annotator, describeError, setAnnotator } from "./api.js";
import { Doc, dropWork, keptWork, loadWork, maskArea, maskBits, maskBox, pruneWork, saveWork } from "./doc.js";
import * as rle from "./rle.js";
import { View } from "./view.js";

const $ = (id) => document.getElementById(id);
const CURRENT_KEY = "studio.current"; // the item this tab holds (sessionStorage)

const S = {
  me: null,
  item: null, // the item view as served
  doc: null,
  image: null,
  leaseToken: null,
  leaseLost: false,
  openedAt: 0,
  priorSeconds: 0,
  heartbeat: null,
  selPhrase: null,
  selMask: null,
  prompt: null,
  busy: false,
};

const metrics = []; // one entry per drawn predict answer (read by bench/bench_click.py)

// ---------------------------------------------------------------- status
function status(msg, kind = "info") {
  const el = $("status");
  el.textContent = msg;
  el.className = `status-${kind}`;
  el.dataset.kind = kind;
  if (kind === "error") console.warn(msg);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "testid") e.dataset.testid = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const fmt = (x, d = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;

// ---------------------------------------------------------------- sign in
let authByToken = false; // the studio has authentication: annotators sign in with a token

async function showSignin() {
  $("app").hidden = true;
  $("signin").hidden = false;
  try {
    authByToken = (await api.config()).auth;
  } catch (e) {
    $("signin-error").textContent = describeError(e);
  }
  $("signin-by-name").hidden = authByToken;
  $("signin-by-token").hidden = !authByToken;
  $("signin-name").required = !authByToken;
  $("signin-token").required = authByToken;
  (authByToken ? $("signin-token") : $("signin-name")).focus();
}

async function signin() {
  $("signin-error").textContent = "";
  const token = $("signin-token").value.trim();
  try {
    const res = await api.signin(authByToken ? { token } : { name: $("signin-name").value.trim() });
    setAnnotator(res.annotator, authByToken ? token : null);
    startApp();
  } catch (e) {
    $("signin-error").textContent = describeError(e);
  }
}

function signout() {
  if (S.item && !S.leaseLost) saveNow();
  stopHeartbeat();
  setAnnotator(null);
  sessionStorage.removeItem(CURRENT_KEY);
  location.reload();
}

let queueTimer = null;
function startApp() {
  S.me = annotator();
  $("signin").hidden = true;
  $("app").hidden = false;
  $("annotator").textContent = S.me;
  refreshQueue();
  clearInterval(queueTimer);
  queueTimer = setInterval(refreshQueue, 3000);
  pruneWork();
  updateKept();
  updateButtons();
  if (sessionStorage.getItem(CURRENT_KEY)) nextItem(); // a reload: the item held comes back first
}

async function refreshQueue() {
  try {
    const q = await api.queue();
    $("queue-waiting").textContent = q.waiting;
    const bands = Object.entries(q.bands || {}).filter(([, n]) => n > 0).map(([b, n]) => `${b} ${n}`);
    $("queue-bands").textContent = bands.length ? `(${bands.join(" · ")})` : "";
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) { setAnnotator(null); showSignin(); return; }
    $("queue-waiting").textContent = "?";
  }
}

function updateKept() {
  if (!S.me) return;
  const kept = keptWork(S.me).filter((id) => !S.item || id !== S.item.item_id);
  $("kept-work").textContent = kept.length ? `work kept in this browser for ${kept.length} other item(s)` : "";
}

// ---------------------------------------------------------------- items
async function nextItem() {
  if (S.busy) return;
  if (S.item && !S.leaseLost) { status("finish this item first: submit, skip or discard", "warn"); return; }
  S.busy = true;
  updateButtons();
  status("asking for the next item…");
  try {
    const view = await api.next();
    await openItem(view);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      closeItem();
      sessionStorage.removeItem(CURRENT_KEY);
      $("empty-state").innerHTML = "Nothing waits: the queue is empty. <b>Next item</b> asks again.";
      $("empty-state").dataset.state = "nothing";
      status((S.lastDone ? `${S.lastDone} · ` : "") + "nothing waits");
      S.lastDone = null;
    } else {
      status(`next item: ${describeError(e)}`, "error");
    }
  } finally {
    S.busy = false;
    updateButtons();
  }
}

async function openItem(view) {
  closeItem();
  const image = await api.image(view.image_url);
  S.item = view;
  S.image = image;
  S.leaseToken = view.lease.token;
  S.leaseLost = false;
  S.openedAt = Date.now();
  S.priorSeconds = 0;
  const saved = loadWork(S.me, view.item_id);
  let restored = false;
  if (saved && saved.phrases) {
    try {
      S.doc = Doc.restore(view, saved.phrases);
      S.priorSeconds = saved.seconds_spent || 0;
      restored = true;
    } catch (e) {
      console.warn("saved work unreadable", e);
    }
  }
  if (!restored) S.doc = new Doc(view);
  S.doc.onChange(onDocChange);
  S.prompt = newPrompt();
  const positives = S.doc.phrases.filter((p) => !p.is_negative);
  S.selPhrase = positives.length ? positives[0].key : null;
  S.selMask = null;
  sessionStorage.setItem(CURRENT_KEY, view.item_id);
  $("empty-state").hidden = true;
  $("banner").hidden = true;
  VIEW.setItem(image, S.doc);
  setTool("point");
  renderAll();
  startHeartbeat(view.lease.heartbeat_s);
  updateKept();
  const what = view.stage === "assisted_manual" ? " (stage 1: add the phrases, mask each by clicks)" : "";
  const before = S.lastDone ? `${S.lastDone} · ` : "";
  S.lastDone = null;
  status(before + (restored ? `restored your work on ${view.source} kept in this browser${what}`
    : `opened ${view.source}${what}`), restored ? "warn" : "info");
}

function closeItem() {
  stopHeartbeat();
  S.item = null;
  S.doc = null;
  S.image = null;
  S.selPhrase = S.selMask = null;
  S.prompt = newPrompt();
  S.leaseLost = false;
  VIEW.setItem(null, null);
  $("empty-state").hidden = false;
  $("empty-state").dataset.state = "idle";
  $("empty-state").innerHTML = "Press <b>Next item</b> to start.";
  $("banner").hidden = true;
  $("latency").textContent = "";
  renderAll();
}

function secondsSpent() {
  return Math.round((S.priorSeconds + (Date.now() - S.openedAt) / 1000) * 10) / 10;
}

let saveTimer = null;
function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = null;
  if (S.doc && S.me) {
    saveWork(S.me, S.doc, { lease_token: S.leaseToken, seconds_spent: secondsSpent(),
      lease_lost: S.leaseLost });
  }
}

function onDocChange() {
  clearTimeout(saveTimer);
  saveTimer = setTimeout(saveNow, 250);
  // the selection may point at something an undo removed
  if (S.selMask && !S.doc.findMask(S.selMask)) S.selMask = null;
  if (S.selPhrase && !S.doc.phrase(S.selPhrase)) S.selPhrase = null;
  VIEW.selectedMask = S.selMask;
  VIEW.schedule();
  renderAll();
}

// ---------------------------------------------------------------- lease
function startHeartbeat(seconds) {
  stopHeartbeat();
  const every = Math.max(1, Number(seconds) || 60) * 1000;
  S.heartbeat = setInterval(beat, every);
}

function stopHeartbeat() {
  clearInterval(S.heartbeat);
  S.heartbeat = null;
}

async function beat() {
  if (!S.item || S.leaseLost) return;
  const id = S.item.item_id;
  try {
    const lease = await api.heartbeat(id, S.leaseToken);
    if (lease && lease.token) S.leaseToken = lease.token;
  } catch (e) {
    if (!S.item || S.item.item_id !== id) return;
    if (e instanceof ApiError && e.status === 409) leaseLost(e);
    else status(`heartbeat: ${describeError(e)} (will retry)`, "warn");
  }
}

function leaseLost(err) {
  S.leaseLost = true;
  stopHeartbeat();
  saveNow();
  const detail = err ? describeError(err) : "";
  $("banner-text").textContent =
    "Your lease on this item expired or the item was taken over by another annotator. " +
    "Your work is kept in this browser (it comes back if you get this item again). " +
    "Take the next item." + (detail ? ` [${detail}]` : "");
  $("banner").hidden = false;
  sessionStorage.removeItem(CURRENT_KEY);
  status("lease lost: your work is kept in this browser", "error");
  updateButtons();
  updateKept();
}

// ---------------------------------------------------------------- submit / skip
async function submit(decision) {
  if (!S.item || S.busy) return;
  if (S.leaseLost) { status("the lease is gone: this item can't be submitted from here", "error"); return; }
  const id = S.item.item_id;
  let body;
  try {
    body = { lease_token: S.leaseToken, decision, seconds_spent: secondsSpent(),
      phrases: S.doc.submitPhrases() };
  } catch (e) {
    status(`cannot build the submission: ${e.message}`, "error");
    return;
  }
  window.studio.lastSubmit = body;
  S.busy = true;
  updateButtons();
  status(decision === "discard" ? "discarding…" : "submitting…");
  try {
    const res = await api.submit(id, body);
    dropWork(S.me, id);
    sessionStorage.removeItem(CURRENT_KEY);
    S.busy = false;
    closeItem();
    S.lastDone = `${decision === "discard" ? "discarded" : "submitted"} ${id.slice(0, 8)}: ${res.state}` +
      (res.audit ? " (picked for an audit)" : "");
    status(S.lastDone, "ok");
    window.studio.lastResult = res;
    refreshQueue();
    await nextItem();
  } catch (e) {
    S.busy = false;
    if (e instanceof ApiError && e.status === 409) leaseLost(e);
    else status(`submit: ${describeError(e)}`, "error");
  } finally {
    S.busy = false;
    updateButtons();
  }
}

async function skip() {
  if (!S.item || S.busy) return;
  if (S.leaseLost) { closeItem(); return; }
  const id = S.item.item_id;
  S.busy = true;
  try {
    await api.release(id, S.leaseToken);
    dropWork(S.me, id);
    sessionStorage.removeItem(CURRENT_KEY);
    closeItem();
    status(`released ${id.slice(0, 8)} back to the queue`, "ok");
    refreshQueue();
  } catch (e) {
    if (e instanceof ApiError && e.status === 409) leaseLost(e);
    else status(`skip: ${describeError(e)}`, "error");
  } finally {
    S.busy = false;
    updateButtons();
  }
}

function updateButtons() {
  const open = !!S.item;
  const live = open && !S.leaseLost;
  $("btn-next").disabled = S.busy || live;
  $("btn-skip").disabled = S.busy || !live;
  $("btn-discard").disabled = S.busy || !live;
  $("btn-submit").disabled = S.busy || !live;
  $("btn-undo").disabled = !open || !S.doc.canUndo();
  $("btn-redo").disabled = !open || !S.doc.canRedo();
  $("btn-undo").title = open && S.doc.canUndo() ? `undo ${S.doc.past[S.doc.past.length - 1].label} (Ctrl+Z)` : "undo (Ctrl+Z)";
  $("btn-redo").title = open && S.doc.canRedo() ? `redo ${S.doc.future[S.doc.future.length - 1].label} (Ctrl+Shift+Z)` : "redo (Ctrl+Shift+Z)";
  const c = S.prompt && S.prompt.candidates.length;
  $("btn-accept-mask").disabled = !c || !S.selPhrase || !live;
}

// ---------------------------------------------------------------- rendering the sidebar
function renderAll() {
  renderInfo();
  renderPhrases();
  renderNegatives();
  renderPrompt();
  renderSelection();
  updateButtons();
}

function renderInfo() {
  const dl = $("item-info");
  dl.replaceChildren();
  const v = S.item;
  if (!v) { dl.append(el("dd", { class: "muted", text: "no item open" })); return; }
  const rows = [
    ["source", v.source, "info-source"], ["stage", v.stage, "info-stage"], ["state", v.state, "info-state"],
    ["score", fmt(v.score, 3), "info-score"], ["band", v.band || "–", "info-band"],
    ["reason", v.reason || "–", "info-reason"],
    ["why", (v.failure_modes || []).map((m) => m.replaceAll("_", " ")).join(", ") || "–", "info-why"],
    ["size", `${v.width} × ${v.height}`, "info-size"],
  ];
  if (v.audit_of) rows.push(["audit of", v.audit_of, "info-audit"]);
  for (const [k, val, tid] of rows) {
    dl.append(el("dt", { text: k }), el("dd", { text: val, testid: tid, title: String(val) }));
  }
}

function verdictChip(v) {
  const idx = v.mask_indices && v.mask_indices.length ? ` #${v.mask_indices.map((i) => i + 1).join(",")}` : "";
  return el("span", { class: `chip verdict ${v.choice}`, testid: "verdict",
    title: `${v.check} check by ${v.source || "?"}: ${v.choice}, score ${fmt(v.score, 3)}`,
    text: `${v.check}${idx}: ${v.choice} ${fmt(v.score)}` });
}

function choiceButtons(current, options, onPick, testid) {
  const wrap = el("span", { class: "seg", testid });
  for (const [value, label, tid, title] of options) {
    wrap.append(el("button", { class: current === value ? "on" : null, testid: tid, title,
      "aria-pressed": current === value ? "true" : "false", text: label,
      onclick: (ev) => { ev.stopPropagation(); onPick(current === value ? null : value); } }));
  }
  return wrap;
}

function renderPhrases() {
  const ul = $("phrase-list");
  ul.replaceChildren();
  if (!S.doc) return;
  const positives = S.doc.phrases.filter((p) => !p.is_negative);
  if (!positives.length) {
    ul.append(el("li", { class: "muted small empty-list", testid: "no-phrases",
      text: S.item.stage === "assisted_manual" ? "No phrases yet: add every object kind you see below, then mask each instance by clicks."
        : "No positive phrases." }));
  }
  for (const p of positives) ul.append(phraseRow(p));
  const all = S.doc.phrases.filter((p) => !p.is_negative);
  $("toggle-all").checked = all.length === 0 || all.every((p) => p.visible);
}

function phraseRow(p) {
  const doc = S.doc;
  const selected = p.key === S.selPhrase;
  const li = el("li", { class: `phrase${selected ? " selected" : ""}${p.ungroundable ? " ungroundable" : ""}`,
    testid: "phrase", "data-phrase": p.phrase, "data-key": p.key,
    onclick: () => selectPhrase(p.key) });
  const name = el("span", { class: "phrase-name", testid: "phrase-name", text: p.phrase, title: p.phrase });
  const head = el("div", { class: "phrase-head" },
    el("input", { type: "checkbox", testid: "phrase-visible", title: "show/hide this phrase's masks",
      checked: p.visible, onclick: (ev) => ev.stopPropagation(),
      onchange: (ev) => doc.setVisible(p.key, ev.target.checked) }),
    el("span", { class: "swatch", style: `background:${rgb(p.color)}` }),
    name,
    p.original_phrase === null ? el("span", { class: "chip human", text: "added", title: "added by you" })
      : p.original_phrase !== p.phrase ? el("span", { class: "chip", text: `was “${p.original_phrase}”` }) : null,
    p.negative_check === "present" ? el("span", { class: "chip neg", testid: "was-negative",
      text: "was hard negative", title: "proposed as a hard negative, marked present" }) : null,
    el("span", { class: "spacer" }),
    el("button", { class: "icon", testid: "phrase-rename", title: "rename", text: "✎",
      onclick: (ev) => { ev.stopPropagation(); startRename(li, p); } }),
  );
  li.append(head);
  const m = p.meta;
  if (m) {
    const figs = el("div", { class: "figs small" },
      el("span", { testid: "phrase-score", title: "verifier score of the phrase", text: `score ${fmt(m.score)}` }),
      el("span", { testid: "phrase-ev", title: "exhaustivity check: every instance masked?",
        text: `EV ${fmt(m.ev_score)}${m.ev_choice ? ` ${m.ev_choice}` : ""}` }),
      m.state ? el("span", { class: "muted", text: m.state }) : null,
      m.provenance ? el("span", { class: "muted", text: m.provenance }) : null);
    li.append(figs);
    if (m.verdicts && m.verdicts.length) li.append(el("div", { class: "verdicts" }, ...m.verdicts.map(verdictChip)));
  }
  const controls = el("div", { class: "phrase-controls small" },
    el("span", { class: "muted", text: "exhaustive" }),
    choiceButtons(p.exhaustive, [[true, "yes", "ev-yes", "every instance is masked"],
      [false, "no", "ev-no", "some instances are missing"]], (v) => doc.setExhaustive(p.key, v), "ev"),
    el("label", { class: "inline", title: "this phrase cannot be masked (ambiguous, abstract…)",
      onclick: (ev) => ev.stopPropagation() },
      el("input", { type: "checkbox", testid: "phrase-ungroundable", checked: p.ungroundable,
        onchange: (ev) => doc.setUngroundable(p.key, ev.target.checked) }), " ungroundable"),
    p.negative_check === "present" ? el("button", { class: "link", testid: "back-to-negative",
      title: "it is not in the image after all", text: "back to negatives",
      onclick: (ev) => { ev.stopPropagation(); negativeCheck(p.key, null); } }) : null,
    p.original_phrase === null ? el("button", { class: "link danger", testid: "phrase-remove", text: "remove",
      onclick: (ev) => { ev.stopPropagation(); doc.removePhrase(p.key); } }) : null,
  );
  li.append(controls);
  const ol = el("ol", { class: "masks" });
  p.masks.forEach((mask, i) => ol.append(maskRow(p, mask, i)));
  if (!p.masks.length) ol.append(el("li", { class: "muted small", text: "no masks" }));
  li.append(ol);
  return li;
}

function maskRow(p, mask, i) {
  const doc = S.doc;
  const selected = mask.key === S.selMask;
  const area = maskArea(mask, doc.h, doc.w);
  const li = el("li", { class: `mask${selected ? " selected" : ""} ${mask.decision}`, testid: "mask",
    "data-key": mask.key, "data-index": i, "data-decision": mask.decision, "data-origin": mask.origin,
    onclick: (ev) => { ev.stopPropagation(); selectMask(mask.key); } },
    el("span", { class: "mask-num", text: `#${i + 1}` }),
    el("span", { class: `chip ${mask.origin}`, testid: "mask-origin", text: mask.origin }),
    el("span", { class: "small", testid: "mask-area", text: `${area} px` }),
    mask.mv_score !== null ? el("span", { class: `chip verdict ${mask.mv_choice || ""}`, testid: "mask-mv",
      title: "the verifier's mask check (MV)", text: `MV ${mask.mv_choice || ""} ${fmt(mask.mv_score)}` }) : null,
    mask.predicted_iou !== null ? el("span", { class: "small muted", title: "SAM's predicted IoU / stability",
      text: `iou ${fmt(mask.predicted_iou)}` }) : null,
    el("span", { class: "mask-actions" },
      choiceButtons(mask.decision, [["accept", "✓ accept", "mask-accept", "accept (A)"], ["reject", "✗ reject", "mask-reject", "reject (R)"]],
        (v) => doc.setMaskDecision(mask.key, v || (mask.decision === "accept" ? "reject" : "accept")), "mv"),
      el("button", { class: "icon danger", testid: "mask-delete", title: "delete (Delete)", text: "✕",
        onclick: (ev) => { ev.stopPropagation(); doc.deleteMask(mask.key); } })),
  );
  return li;
}

function startRename(li, p) {
  const nameEl = li.querySelector(".phrase-name");
  const input = el("input", { class: "rename", testid: "phrase-rename-input", value: p.phrase, maxlength: 200,
    onclick: (ev) => ev.stopPropagation() });
  let done = false;
  const finish = (commit) => {
    if (done) return;
    done = true;
    const v = norm(input.value);
    const clash = commit && v && v !== p.phrase ? phraseClash(v, p.is_negative, p.key) : null;
    if (clash) { status(clash, "error"); renderAll(); return; }
    if (commit && v && v !== p.phrase) S.doc.renamePhrase(p.key, v);
    else renderAll();
  };
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); finish(true); }
    if (ev.key === "Escape") { ev.preventDefault(); finish(false); }
    ev.stopPropagation();
  });
  input.addEventListener("blur", () => finish(true));
  nameEl.replaceWith(input);
  input.focus();
  input.select();
}

function renderNegatives() {
  const ul = $("negative-list");
  ul.replaceChildren();
  if (!S.doc) return;
  const negs = S.doc.phrases.filter((p) => p.is_negative);
  if (!negs.length) ul.append(el("li", { class: "muted small", text: "none" }));
  for (const p of negs) {
    const m = p.meta;
    const li = el("li", { class: `negative ${p.negative_check || "undecided"}`, testid: "negative",
      "data-phrase": p.phrase, "data-key": p.key, "data-check": p.negative_check || "" },
      el("span", { class: "phrase-name", testid: "negative-name", text: p.phrase }),
      p.original_phrase === null ? el("span", { class: "chip human", text: "added" }) : null,
      m ? el("span", { class: "small muted", testid: "negative-score", title: "verifier score",
        text: `${fmt(m.score)}` }) : null,
      el("span", { class: "spacer" }),
      p.proposed_negative ? choiceButtons(p.negative_check, [
        ["absent", "absent ✓", "neg-absent", "confirmed: not in the image"],
        ["present", "present", "neg-present", "it is in the image: mask it as a positive phrase"],
      ], (v) => negativeCheck(p.key, v), "negcheck")
        : el("button", { class: "link danger", testid: "negative-remove", text: "remove",
          onclick: () => S.doc.removePhrase(p.key) }),
    );
    if (m && m.verdicts && m.verdicts.length) li.append(el("div", { class: "verdicts" }, ...m.verdicts.map(verdictChip)));
    ul.append(li);
  }
}

/** Phrase text as the server normalises it (whitespace collapsed). */
const norm = (t) => t.split(/\s+/).filter(Boolean).join(" ");

/** Why `name` can't be a phrase of that polarity here, or null (each (phrase, is_negative) once). */
function phraseClash(name, isNegative, exceptKey = null) {
  if (!name) return "a phrase needs a text";
  const same = S.doc.phrases.find((p) => p.key !== exceptKey && p.phrase === name && p.is_negative === isNegative);
  return same ? `“${name}” is already a ${isNegative ? "hard negative" : "phrase"} of this item` : null;
}

function negativeCheck(key, value) {
  if (value === "present" || value === null) {
    const p = S.doc.phrase(key);
    const clash = phraseClash(p.phrase, value !== "present", key);
    if (clash) { status(clash, "error"); return; }
  }
  S.doc.setNegativeCheck(key, value);
  if (value === "present") {
    selectPhrase(key);
    const p = S.doc.phrase(key);
    status(`“${p.phrase}” is present: it is now a positive phrase, mask its instances`, "ok");
  }
}

function renderPrompt() {
  const target = $("prompt-target");
  const p = S.doc && S.selPhrase ? S.doc.phrase(S.selPhrase) : null;
  target.textContent = p ? p.phrase : "select or add a phrase";
  target.className = p ? "" : "muted";
  if (p) target.style.color = rgb(p.color); else target.style.color = "";
  const pr = S.prompt;
  const pos = pr.points.filter((q) => q.label === 1).length;
  const neg = pr.points.length - pos;
  $("prompt-summary").textContent = !pr.points.length && !pr.box
    ? "click the image: left = object, right/Shift = background; B for a box"
    : `${pos} positive, ${neg} negative point(s)${pr.box ? ", a box" : ""}${pr.inflight ? " · predicting…" : ""}`;
  renderCandidates();
}

function renderCandidates() {
  const box = $("candidates");
  box.replaceChildren();
  const pr = S.prompt;
  pr.candidates.forEach((c, i) => {
    const thumb = el("canvas", { class: "thumb", width: 1, height: 1 });
    const b = el("button", { class: `candidate${i === pr.chosen ? " chosen" : ""}`, testid: `candidate-${i}`,
      "data-index": i, "aria-pressed": i === pr.chosen ? "true" : "false",
      title: `candidate ${i + 1} (key ${i + 1}): predicted IoU ${fmt(c.predicted_iou, 3)}, stability ${fmt(c.stability_score, 3)}`,
      onclick: () => chooseCandidate(i) },
    thumb,
    el("span", { class: "small", text: `${i + 1} · iou ${fmt(c.predicted_iou)} · ${c.area ?? "?"} px` }));
    box.append(b);
    c.thumb = thumb;
  });
  scheduleThumbs();
}

let thumbTimer = null;
function scheduleThumbs() {
  clearTimeout(thumbTimer);
  thumbTimer = setTimeout(drawThumbs, 0); // after the main canvas draw: off the click-to-mask path
}

function drawThumbs() {
  const pr = S.prompt;
  if (!S.doc || !S.image) return;
  const tw = 96;
  const th = Math.max(1, Math.round((tw * S.doc.h) / S.doc.w));
  const color = currentColor();
  for (const c of pr.candidates) {
    if (!c.thumb) continue;
    c.thumb.width = tw;
    c.thumb.height = th;
    const ctx = c.thumb.getContext("2d");
    ctx.drawImage(S.image, 0, 0, tw, th);
    ctx.globalAlpha = 0.75;
    ctx.drawImage(candidateOverlay(c, color).canvas, 0, 0, tw, th);
    ctx.globalAlpha = 1;
  }
}

function renderSelection() {
  const box = $("selection");
  const found = S.doc && S.selMask ? S.doc.findMask(S.selMask) : null;
  if (!found) {
    box.className = "muted small";
    box.textContent = "none: click a mask in the list, or use Select (V)";
    return;
  }
  const { phrase, mask } = found;
  const [x, y, w, h] = rle.bbox(maskBits(mask, S.doc.h, S.doc.w), S.doc.h, S.doc.w);
  box.className = "small";
  box.replaceChildren(
    el("div", {}, el("b", { text: phrase.phrase }), ` #${phrase.masks.indexOf(mask) + 1} · ${mask.origin} · `,
      el("span", { class: `chip ${mask.decision}`, text: mask.decision })),
    el("div", { class: "muted", text: `area ${maskArea(mask, S.doc.h, S.doc.w)} px · bbox ${x},${y} ${w}×${h}` }),
    el("div", { class: "muted", text: "A/R accept/reject · Delete · X brush / E eraser paint into it" }),
  );
}

// ---------------------------------------------------------------- selection
function selectPhrase(key) {
  if (S.selPhrase === key && !S.selMask) return;
  S.selPhrase = key;
  S.selMask = null;
  VIEW.selectedMask = null;
  const p = S.doc.phrase(key);
  if (p && !p.visible) S.doc.setVisible(key, true);
  VIEW.schedule();
  renderAll();
}

function selectMask(key) {
  const found = S.doc.findMask(key);
  if (!found) return;
  S.selMask = key;
  S.selPhrase = found.phrase.key;
  VIEW.selectedMask = key;
  if (!found.phrase.visible) S.doc.setVisible(found.phrase.key, true);
  VIEW.schedule();
  renderAll();
}

function pickAt(x, y) {
  const xi = Math.floor(x), yi = Math.floor(y);
  const idx = yi * S.doc.w + xi;
  const phrases = S.doc.phrases.filter((p) => p.visible && !p.is_negative);
  // topmost first: the last drawn; prefer another mask than the selected one when they overlap
  const hits = [];
  for (let i = phrases.length - 1; i >= 0; i--) {
    const p = phrases[i];
    for (let j = p.masks.length - 1; j >= 0; j--) {
      if (maskBits(p.masks[j], S.doc.h, S.doc.w)[idx]) hits.push(p.masks[j].key);
    }
  }
  if (!hits.length) { S.selMask = null; VIEW.selectedMask = null; VIEW.schedule(); renderAll(); return; }
  const at = hits.indexOf(S.selMask);
  selectMask(hits[(at + 1) % hits.length]);
}

function currentColor() {
  const p = S.doc && S.selPhrase ? S.doc.phrase(S.selPhrase) : null;
  return p ? p.color : [255, 255, 255];
}

// ---------------------------------------------------------------- prompts and predict
function newPrompt() {
  return { points: [], box: null, candidates: [], chosen: 0, logitsKey: null, gen: (newPrompt.gen = (newPrompt.gen || 0) + 1),
    inflight: false, dirty: false, clickAt: 0 };
}

function clearPrompt() {
  S.prompt = newPrompt();
  VIEW.prompt = S.prompt;
  VIEW.candidate = null;
  VIEW.schedule();
  renderPrompt();
  updateButtons();
}

function addPoint(x, y, label) {
  if (!S.item) return;
  if (S.leaseLost) { status("the lease is gone: take the next item", "warn"); return; }
  S.prompt.points.push({ x, y, label });
  S.prompt.clickAt = performance.now();
  VIEW.prompt = S.prompt;
  VIEW.schedule();
  predict();
}

function setBox(box) {
  if (!S.item || S.leaseLost) return;
  S.prompt.box = box;
  S.prompt.clickAt = performance.now();
  VIEW.prompt = S.prompt;
  VIEW.schedule();
  predict();
}

async function predict() {
  const pr = S.prompt;
  if (pr.inflight) { pr.dirty = true; return; }
  if (!pr.points.length && !pr.box) return;
  pr.inflight = true;
  pr.dirty = false;
  renderPrompt();
  const item = S.item;
  const clickAt = pr.clickAt;
  const body = {
    lease_token: S.leaseToken,
    points: pr.points.map((q) => ({ x: q.x, y: q.y, label: q.label })),
    box: pr.box,
    mask_input: pr.logitsKey ? { logits_key: pr.logitsKey, index: pr.chosen } : null,
    multimask: true,
  };
  const tReq = performance.now();
  let res;
  try {
    res = await api.predict(item.item_id, body);
  } catch (e) {
    pr.inflight = false;
    if (S.prompt !== pr) return;
    if (e instanceof ApiError && e.status === 409) leaseLost(e);
    else status(`predict: ${describeError(e)}`, "error");
    renderPrompt();
    return;
  }
  const tRes = performance.now();
  pr.inflight = false;
  if (S.prompt !== pr || S.item !== item) return; // cleared or another item meanwhile
  pr.candidates = res.candidates;
  pr.logitsKey = res.logits_key;
  pr.chosen = 0;
  const m = { click_to_response_ms: tRes - clickAt, http_ms: tRes - tReq, timings_ms: res.timings_ms || {},
    server_timing: res.server_timing || {}, candidates: res.candidates.length,
    rle_chars: res.candidates.reduce((a, c) => a + c.rle.counts.length, 0) };
  const t0 = performance.now();
  showCandidate(0); // decode + overlay + draw the best candidate
  const tDrawn = performance.now();
  m.decode_ms = showCandidate.decodeMs;
  m.overlay_ms = showCandidate.overlayMs;
  m.draw_ms = showCandidate.drawMs;
  m.client_ms = tDrawn - t0;
  m.click_to_drawn_ms = tDrawn - clickAt;
  metrics.push(m);
  requestAnimationFrame(() => { m.click_to_frame_ms = performance.now() - clickAt; });
  $("latency").textContent = `click → mask ${m.click_to_drawn_ms.toFixed(0)} ms (server ${fmt(m.timings_ms.total ?? m.server_timing.total, 0)} ms, decoder ${fmt(m.timings_ms.decoder ?? m.server_timing.decoder, 0)} ms)`;
  renderPrompt();
  updateButtons();
  if (pr.dirty) predict();
}

function candidateBits(c) {
  if (!c.bits) {
    const { mask, box } = rle.decodeWithBox(c.rle);
    c.bits = mask;
    c.box = box;
  }
  return c.bits;
}

function candidateOverlay(c, color) {
  if (!c.overlay || c.overlay.color !== color) {
    c.overlay = VIEW.liveOverlay(c, candidateBits(c), color, c.box);
  }
  return c.overlay;
}

function showCandidate(i) {
  const c = S.prompt.candidates[i];
  if (!c) return;
  const t0 = performance.now();
  candidateBits(c);
  const t1 = performance.now();
  const ov = candidateOverlay(c, currentColor());
  const t2 = performance.now();
  VIEW.candidate = { overlay: ov, index: i };
  VIEW.draw();
  const t3 = performance.now();
  showCandidate.decodeMs = t1 - t0;
  showCandidate.overlayMs = t2 - t1;
  showCandidate.drawMs = t3 - t2;
}

function chooseCandidate(i) {
  const pr = S.prompt;
  if (!pr.candidates[i]) return;
  pr.chosen = i;
  showCandidate(i);
  for (const b of document.querySelectorAll("#candidates .candidate")) {
    const on = Number(b.dataset.index) === i;
    b.classList.toggle("chosen", on);
    b.setAttribute("aria-pressed", on ? "true" : "false");
  }
}

function acceptMask() {
  const pr = S.prompt;
  const c = pr.candidates[pr.chosen];
  if (!c) { status("no candidate: click the image first", "warn"); return; }
  const p = S.selPhrase ? S.doc.phrase(S.selPhrase) : null;
  if (!p || p.is_negative) {
    status("select or add a phrase to add the mask to", "warn");
    if (!S.doc.phrases.some((q) => !q.is_negative)) $("add-phrase-input").focus();
    return;
  }
  const mask = S.doc.addMask(p.key, {
    rle: c.rle, bits: candidateBits(c), decision: "accept", origin: "human",
    predicted_iou: c.predicted_iou, stability_score: c.stability_score,
    point_coords: pr.points.filter((q) => q.label === 1).map((q) => [q.x, q.y]),
  }, "accept mask");
  if (c.overlay && c.overlay.color === p.color) VIEW.overlays.set(mask, c.overlay); // drawn already: reuse
  clearPrompt();
  selectMask(mask.key);
  status(`added a mask to “${p.phrase}”`, "ok");
}

// ---------------------------------------------------------------- annotator figures
const pct = (x) => (x === null || x === undefined ? "–" : `${(Number(x) * 100).toFixed(1)} %`);

function duration(seconds) {
  const x = Number(seconds) || 0;
  if (x < 60) return `${x.toFixed(1)} s`;
  const s = Math.round(x);
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

let figuresSeq = 0; // answers to an earlier opening are dropped
async function loadFigures() {
  const seq = ++figuresSeq;
  const dlg = $("figures");
  dlg.dataset.state = "loading";
  $("figures-error").hidden = true;
  $("figures-updated").textContent = "loading…";
  $("figures-refresh").disabled = true;
  try {
    const res = await api.annotators();
    if (seq !== figuresSeq) return;
    renderFigures(res.annotators || []);
    $("figures-updated").textContent = `as of ${new Date().toLocaleTimeString()}`;
    dlg.dataset.state = "ready";
  } catch (e) {
    if (seq !== figuresSeq) return;
    $("figures-rows").replaceChildren();
    $("figures-empty").hidden = true;
    $("figures-error").textContent = `figures: ${describeError(e)}`;
    $("figures-error").hidden = false;
    $("figures-updated").textContent = "";
    dlg.dataset.state = "error";
  } finally {
    if (seq === figuresSeq) $("figures-refresh").disabled = false;
  }
}

function renderFigures(rows) {
  const body = $("figures-rows");
  body.replaceChildren();
  for (const f of rows) {
    const me = f.annotator === S.me;
    const audited = f.audits > 0; // no audits yet: the agreement figures are not zero, they are unknown
    const cell = (text, col, title) => el("td", { text, testid: `fig-${col}`, title });
    body.append(el("tr", { class: me ? "me" : null, testid: "figures-row", "data-annotator": f.annotator,
      "data-me": me ? "true" : null, "aria-current": me ? "true" : null },
      el("th", { class: "text", scope: "row", testid: "fig-annotator", title: f.annotator },
        f.annotator, me ? el("span", { class: "chip you", text: "you" }) : null),
      cell(String(f.items), "items"),
      cell(String(f.masks), "masks"),
      cell(duration(f.seconds), "seconds", `${fmt(f.seconds, 1)} s`),
      cell(fmt(f.items_per_hour, 1), "items-per-hour"),
      cell(fmt(f.masks_per_hour, 1), "masks-per-hour"),
      cell(fmt(f.seconds_per_item, 1), "seconds-per-item"),
      cell(f.masks ? fmt(f.seconds_per_mask, 1) : "–", "seconds-per-mask"),
      cell(String(f.audits), "audits"),
      cell(audited ? pct(f.audit_decision_agreement) : "–", "audit-agreement"),
      cell(audited ? fmt(f.audit_mask_iou, 2) : "–", "audit-iou")));
  }
  $("figures-empty").hidden = rows.length > 0;
}

function openFigures() {
  const dlg = $("figures");
  if (!dlg.open) dlg.showModal();
  $("figures-close").focus();
  loadFigures();
}

function closeFigures() {
  const dlg = $("figures");
  if (dlg.open) dlg.close();
}

// ---------------------------------------------------------------- brush and eraser
function strokeStart(x, y, value) {
  if (!S.doc) return false;
  let maskKey = S.selMask;
  let phrase = maskKey ? S.doc.findMask(maskKey).phrase : (S.selPhrase ? S.doc.phrase(S.selPhrase) : null);
  if (!phrase || phrase.is_negative) { status("select a phrase or a mask to paint into", "warn"); return false; }
  if (!maskKey && value === 0) { status("select a mask to erase from", "warn"); return false; }
  const base = maskKey ? maskBits(S.doc.findMask(maskKey).mask, S.doc.h, S.doc.w) : null;
  const bits = base ? new Uint8Array(base) : new Uint8Array(S.doc.h * S.doc.w);
  const keyObj = {};
  const overlay = VIEW.liveOverlay(keyObj, bits, phrase.color,
    maskKey ? maskBox(S.doc.findMask(maskKey).mask, S.doc.h, S.doc.w) : null);
  VIEW.stroke = { maskKey, phraseKey: phrase.key, overlay, bits, value, last: null, changed: false };
  dab(x, y);
  VIEW.schedule();
  return true;
}

function dab(x, y) {
  const st = VIEW.stroke;
  const r = VIEW.brushRadius;
  const { w, h } = S.doc;
  const from = st.last || { x, y };
  const dist = Math.hypot(x - from.x, y - from.y);
  const steps = Math.max(1, Math.ceil(dist / Math.max(0.5, r / 3)));
  let bx0 = w, by0 = h, bx1 = -1, by1 = -1;
  for (let s = 1; s <= steps; s++) {
    const cx = from.x + ((x - from.x) * s) / steps;
    const cy = from.y + ((y - from.y) * s) / steps;
    const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(w - 1, Math.ceil(cx + r));
    const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(h - 1, Math.ceil(cy + r));
    for (let yy = y0; yy <= y1; yy++) {
      const dy = yy + 0.5 - cy;
      for (let xx = x0; xx <= x1; xx++) {
        const dx = xx + 0.5 - cx;
        if (dx * dx + dy * dy <= r * r) {
          const i = yy * w + xx;
          if (st.bits[i] !== st.value) { st.bits[i] = st.value; st.changed = true; }
        }
      }
    }
    bx0 = Math.min(bx0, x0); by0 = Math.min(by0, y0); bx1 = Math.max(bx1, x1); by1 = Math.max(by1, y1);
  }
  st.last = { x, y };
  if (bx1 >= bx0) st.overlay.paint(bx0 - 1, by0 - 1, bx1 + 1, by1 + 1);
}

function strokeMove(x, y) {
  if (!VIEW.stroke) return;
  dab(x, y);
}

function strokeEnd() {
  const st = VIEW.stroke;
  VIEW.stroke = null;
  if (!st || !st.changed) { VIEW.schedule(); return; }
  let mask;
  if (st.maskKey) {
    mask = S.doc.paintMask(st.maskKey, st.bits, st.value ? "brush" : "erase");
  } else {
    mask = S.doc.addMask(st.phraseKey, { bits: st.bits, decision: "accept", origin: "human" }, "paint mask");
  }
  st.overlay.bits = st.bits;
  VIEW.overlays.set(mask, st.overlay); // the stroke's overlay is the new mask's: no repaint
  selectMask(mask.key);
}

// ---------------------------------------------------------------- tools and keys
function setTool(tool) {
  VIEW.tool = tool;
  for (const b of document.querySelectorAll(".tool")) b.classList.toggle("on", b.dataset.tool === tool);
  $("canvas").dataset.tool = tool;
  VIEW.schedule();
}

function setRadius(r) {
  r = Math.max(1, Math.min(100, Math.round(r)));
  VIEW.brushRadius = r;
  $("brush-radius").value = r;
  $("brush-radius-value").textContent = r;
  VIEW.schedule();
}

function undo() {
  if (!S.doc) return;
  const label = S.doc.undo();
  if (label) status(`undid: ${label}`);
}

function redo() {
  if (!S.doc) return;
  const label = S.doc.redo();
  if (label) status(`redid: ${label}`);
}

function onKey(ev) {
  if ($("figures").open) { // a modal: the studio's shortcuts wait until it closes
    if (ev.key === "Escape") { ev.preventDefault(); closeFigures(); }
    return;
  }
  const t = ev.target;
  const typing = t && (t.tagName === "INPUT" && t.type !== "checkbox" && t.type !== "range" || t.tagName === "TEXTAREA");
  if (typing) {
    if (ev.key === "Escape") t.blur();
    return;
  }
  if ($("app").hidden) return;
  const k = ev.key;
  const ctrl = ev.ctrlKey || ev.metaKey;
  if (ctrl && (k === "z" || k === "Z")) { ev.preventDefault(); if (ev.shiftKey) redo(); else undo(); return; }
  if (ctrl && (k === "y" || k === "Y")) { ev.preventDefault(); redo(); return; }
  if (ctrl || ev.altKey) return;
  if (k === " ") { VIEW.spaceDown = true; if (t === document.body || t === $("canvas")) ev.preventDefault(); return; }
  if (k === "Enter") {
    ev.preventDefault();
    if (ev.shiftKey) submit("accept");
    else if (!S.item || S.leaseLost) nextItem();
    else acceptMask();
    return;
  }
  if (!S.item) return;
  switch (k.toLowerCase()) {
    case "escape": clearPrompt(); VIEW.dragBox = null; break;
    case "p": setTool("point"); break;
    case "n": setTool("negative"); break;
    case "b": setTool("box"); break;
    case "x": setTool("brush"); break;
    case "e": setTool("eraser"); break;
    case "v": setTool("select"); break;
    case "1": case "2": case "3": chooseCandidate(Number(k) - 1); break;
    case "[": setRadius(VIEW.brushRadius - (VIEW.brushRadius > 10 ? 2 : 1)); break;
    case "]": setRadius(VIEW.brushRadius + (VIEW.brushRadius >= 10 ? 2 : 1)); break;
    case "a": if (S.selMask) S.doc.setMaskDecision(S.selMask, "accept"); break;
    case "r": if (S.selMask) S.doc.setMaskDecision(S.selMask, "reject"); break;
    case "delete": case "backspace": if (S.selMask) S.doc.deleteMask(S.selMask); break;
    case "s": skip(); break;
    case "h": S.doc.setAllVisible(!S.doc.phrases.filter((p) => !p.is_negative).every((p) => p.visible)); break;
    case "f": VIEW.fit(); break;
    default: return;
  }
  ev.preventDefault();
}

// ---------------------------------------------------------------- wiring
const VIEW = new View($("canvas"), {
  point: (x, y, label) => addPoint(x, y, label),
  box: (box) => setBox(box),
  strokeStart, strokeMove, strokeEnd,
  pick: pickAt,
});

function wire() {
  $("signin-form").addEventListener("submit", (ev) => { ev.preventDefault(); signin(); });
  $("signout").addEventListener("click", signout);
  $("btn-next").addEventListener("click", nextItem);
  $("banner-next").addEventListener("click", () => { closeItem(); nextItem(); });
  $("btn-skip").addEventListener("click", skip);
  $("btn-submit").addEventListener("click", () => submit("accept"));
  $("btn-discard").addEventListener("click", () => submit("discard"));
  $("btn-undo").addEventListener("click", undo);
  $("btn-redo").addEventListener("click", redo);
  $("btn-fit").addEventListener("click", () => VIEW.fit());
  $("btn-accept-mask").addEventListener("click", acceptMask);
  $("btn-figures").addEventListener("click", openFigures);
  $("figures-close").addEventListener("click", closeFigures);
  $("figures-refresh").addEventListener("click", loadFigures);
  $("figures").addEventListener("click", (ev) => { // a click on the backdrop closes it
    const r = $("figures").getBoundingClientRect();
    if (ev.target === $("figures") && (ev.clientX < r.left || ev.clientX > r.right || ev.clientY < r.top || ev.clientY > r.bottom)) closeFigures();
  });
  $("figures").addEventListener("close", () => { figuresSeq++; $("canvas").focus({ preventScroll: true }); });
  $("btn-clear").addEventListener("click", clearPrompt);
  for (const b of document.querySelectorAll(".tool")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("brush-radius").addEventListener("input", (ev) => setRadius(Number(ev.target.value)));
  $("opacity").addEventListener("input", (ev) => { VIEW.opacity = Number(ev.target.value); VIEW.schedule(); });
  $("toggle-all").addEventListener("change", (ev) => S.doc && S.doc.setAllVisible(ev.target.checked));
  $("add-phrase-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = norm($("add-phrase-input").value);
    if (!S.doc || !name) return;
    const clash = phraseClash(name, false);
    if (clash) { status(clash, "error"); return; }
    const p = S.doc.addPhrase(name, false);
    $("add-phrase-input").value = "";
    $("add-phrase-input").blur();
    selectPhrase(p.key);
    status(`added “${name}”: click its instances on the image`, "ok");
  });
  $("add-negative-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = norm($("add-negative-input").value);
    if (!S.doc || !name) return;
    const clash = phraseClash(name, true);
    if (clash) { status(clash, "error"); return; }
    S.doc.addPhrase(name, true);
    $("add-negative-input").value = "";
    $("add-negative-input").blur();
  });
  document.addEventListener("keydown", onKey);
  // a clicked button gives the keyboard back to the shortcuts (Enter/Space must not press it again)
  document.addEventListener("click", (ev) => {
    const b = ev.target.closest && ev.target.closest("button");
    if (b && b.closest("#app")) b.blur();
  });
  document.addEventListener("keyup", (ev) => { if (ev.key === " ") VIEW.spaceDown = false; });
  window.addEventListener("beforeunload", () => { if (S.item) saveNow(); });
  setTool("point");
  setRadius(8);
}

// the page's state for tests and scripted sessions (read-only use)
window.studio = {
  metrics,
  state: () => S,
  view: VIEW,
  imageToClient: (x, y) => VIEW.toClient(x, y),
  submitBody: () => (S.doc ? S.doc.submitPhrases() : null),
  rle,
};

wire();
if (annotator()) startApp();
else showSignin();
