// The billing page: Settings › Account › Billing, written against the public GraphQL API.
import {
  NetworkError, SignInNeeded, downloadCsv, gql, liveBalance, takeTokenFromFragment, token,
} from "./api.js";
import "./chart.js";

const $ = (sel, root = document) => root.querySelector(sel);
const config = JSON.parse($("#config")?.textContent ?? "{}");
const state = { pricing: null, account: null, viewer: null, cursor: null, users: new Map() };

// ---------------------------------------------------------------- words and numbers

const numberFmt = new Intl.NumberFormat();
const dateFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const dayFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });
const monthFmt = new Intl.DateTimeFormat(undefined, { month: "long", year: "numeric" });
const credits = (n) => `${numberFmt.format(n)} ${Math.abs(n) === 1 ? "credit" : "credits"}`;
function money(cents, currency = state.pricing?.currency ?? "usd") {
  return new Intl.NumberFormat(undefined, { style: "currency", currency: currency.toUpperCase() }).format(cents / 100);
}
const words = (s) => s.toLowerCase().replace(/_/g, " ").replace(/^\w/, (c) => c.toUpperCase());
const PROCESS_WORDS = {
  MANUAL_PURCHASE: "Purchase", AUTO_RECHARGE: "Auto-recharge", HANDWRITTEN_LETTER: "Handwritten letters",
  POSTCARD: "Postcards", ADVANCED_EMAIL_TEST: "Advanced email tests", SOCIAL_MEDIA_APPEND: "Social media appends",
  SMART_MATCH: "Smart matches", PREMIUM_AUDIO_TRANSCRIPTION: "Premium audio transcription",
  BUSINESS_CARD_TRANSCRIPTION: "Business card transcription", PROSPECT_SEARCH: "Prospect search",
  ADMINISTRATIVE: "Administrative",
};
const processWords = (p) => PROCESS_WORDS[p] ?? words(p);
const cardWords = (c) => (c ? `${words(c.brand)} ending ${c.last4}` : "no card");
const TX_TYPES = ["PURCHASE", "AUTO_RECHARGE", "USAGE", "REVERSAL", "REFUND", "GRANT", "ADJUSTMENT"];
const person = (u) => (u ? (u.name && u.email ? `${u.name} (${u.email})` : u.name || u.email || u.userId) : "");

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

// ---------------------------------------------------------------- screens

function show(id) {
  for (const s of ["#loading", "#signin", "#noadmin", "#app"]) $(s).hidden = s !== id;
  $("#main").setAttribute("aria-busy", "false");
}

function signIn(why) {
  $("#signin-why").textContent = why || "Your session has ended.";
  for (const d of document.querySelectorAll("dialog[open]")) d.close();
  show("#signin");
  $("#signin-title").setAttribute("tabindex", "-1");
  $("#signin-title").focus();
}

async function guarded(work) {
  try {
    return await work();
  } catch (err) {
    if (err instanceof SignInNeeded) { signIn(err.message); return undefined; }
    throw err;
  }
}

// ---------------------------------------------------------------- the Purchase Credits box

function renderBalance(balance) {
  state.account.balance = balance;
  $("#balance").textContent = numberFmt.format(balance);
}

function rechargeWords(a) {
  if (a.status === "OFF") return "Auto-recharge is off.";
  const when = a.trigger === "SCHEDULE"
    ? `every ${a.intervalDays} days`
    : `when the balance drops below ${credits(a.thresholdCredits)}`;
  const card = a.usePrimaryCard ? "the primary card" : cardWords(a.card);
  if (a.status === "PAUSED") {
    return `Auto-recharge is paused: ${a.pausedReason} Check the card, then open the settings and press Save to resume.`;
  }
  let text = `Auto-recharge is active: adds ${credits(a.rechargeCredits)} ${when}, charged to ${card}.`;
  if (a.nextRunAt) text += ` Next run ${dateFmt.format(new Date(a.nextRunAt))}.`;
  if (a.lastRunAt) text += ` Last run ${dateFmt.format(new Date(a.lastRunAt))}.`;
  return text;
}

function renderAccount() {
  const a = state.account;
  renderBalance(a.balance);
  $("#recharge-state").textContent = rechargeWords(a.autoRecharge);
  const alert = a.lowBalanceAlert;
  $("#low-alert").textContent = alert.enabled
    ? `Admins are e-mailed when the balance falls below ${credits(alert.levelCredits)}.`
    : "No low-balance e-mail is set.";
  $("#quotas").replaceChildren(...a.freeQuotas.map((q) => el("li", {},
    `${processWords(q.processType)}: ${numberFmt.format(q.used)} of ${numberFmt.format(q.allowance)} free used; resets ${dayFmt.format(new Date(q.periodEnd))}.`)));
  renderCards();
  renderWaiting();
  renderInvoices();
}

async function reload() {
  const data = await gql("BillingAccount");
  state.viewer = data.viewer;
  state.pricing = data.creditPricing;
  state.account = data.creditAccount;
  renderAccount();
}

// ---------------------------------------------------------------- Payment Information

function renderCards() {
  const cards = state.account.cards;
  const only = cards.length === 1;
  $("#cards").replaceChildren(...cards.map((c) => {
    const addr = c.billingAddress
      ? [c.billingAddress.line1, c.billingAddress.line2, c.billingAddress.city, c.billingAddress.state, c.billingAddress.postalCode, c.billingAddress.country].filter(Boolean).join(", ")
      : "";
    const label = cardWords(c);
    return el("li", { "aria-label": label, "data-card": c.id },
      el("div", {},
        el("strong", {}, label), c.isPrimary ? el("span", { class: "badge" }, "Primary") : null,
        el("div", { class: "small" }, `Expires ${String(c.expMonth).padStart(2, "0")}/${c.expYear}`),
        c.cardholderName ? el("div", { class: "small" }, c.cardholderName) : null,
        addr ? el("div", { class: "small muted" }, addr) : null),
      el("div", { class: "actions" },
        el("button", { type: "button", onclick: () => openCardDialog(c) }, "Edit Card"),
        c.isPrimary ? null : el("button", { type: "button", "aria-label": `Make ${label} primary`, onclick: () => makePrimary(c) }, "Make primary"),
        el("button", {
          type: "button", "aria-label": `Remove ${label}`, onclick: () => removeCard(c),
          "aria-describedby": only ? "last-card-note" : null,
        }, "Remove")));
  }));
  if (!cards.length) $("#cards").append(el("li", {}, "No card on file. Add a credit card to buy Purchase Credits."));
  const note = $("#last-card-note");
  note.hidden = !only;
  note.textContent = `This is your only card: to remove it without adding another, contact ${config.support}.`;
}

async function cardAction(work, done) {
  const status = $("#cards-status");
  status.className = "small";
  status.textContent = "Working…";
  try {
    const payload = await guarded(work);
    if (!payload) return;
    if (payload.errors.length) {
      status.className = "small error";
      status.textContent = payload.errors.map((e) => e.message).join(" ");
      return;
    }
    await reload();
    status.textContent = done;
  } catch (err) {
    status.className = "small error";
    status.textContent = err.message;
  }
}

function makePrimary(card) {
  return cardAction(async () => (await gql("SetPrimaryCard", { id: card.id })).setPrimaryCard,
    `${cardWords(card)} is now the primary card.`);
}

function removeCard(card) {
  if (!confirm(`Remove ${cardWords(card)}?`)) return undefined;
  return cardAction(async () => {
    const payload = (await gql("RemoveCard", { id: card.id })).removeCard;
    for (const e of payload.errors) {
      if (e.code === "LAST_CARD") e.message = `This is your only card, so it can't be removed here. To remove it without replacing it, contact ${config.support}.`;
    }
    return payload;
  }, `${cardWords(card)} was removed.`);
}

let stripe = null;
let cardElement = null;
async function loadStripe() {
  if (stripe || config.gateway !== "stripe") return stripe;
  await new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = config.stripeJs;
    s.onload = resolve;
    s.onerror = () => reject(new Error("Stripe.js could not be loaded."));
    document.head.append(s);
  });
  stripe = window.Stripe(config.stripePublishableKey);
  return stripe;
}

let editing = null;
async function openCardDialog(card = null) {
  editing = card;
  const dialog = $("#card-dialog");
  const form = $("#card-form");
  form.reset();
  $("#card-error").textContent = "";
  $("#card-title").textContent = card ? "Edit Card" : "Add Credit Card";
  for (const n of form.querySelectorAll(".new-only")) n.hidden = Boolean(card);
  for (const n of form.querySelectorAll(".edit-only")) n.hidden = !card;
  if (!card) {
    const sandbox = config.gateway !== "stripe";
    $("#sandbox-cards").hidden = !sandbox;
    $("#card-element").hidden = sandbox;
    if (!sandbox) {
      try {
        const s = await loadStripe();
        if (!cardElement) {
          cardElement = s.elements().create("card");
          cardElement.mount("#card-element");
        }
      } catch (err) { $("#card-error").textContent = err.message; }
    }
  } else {
    form.expMonth.value = card.expMonth;
    form.expYear.value = card.expYear;
    form.cardholderName.value = card.cardholderName ?? "";
    const a = card.billingAddress ?? {};
    for (const k of ["line1", "line2", "city", "state", "postalCode", "country"]) form[k].value = a[k] ?? "";
  }
  dialog.showModal();
}

function addressInput(form) {
  const a = {};
  for (const k of ["line1", "line2", "city", "state", "postalCode", "country"]) {
    const v = form[k].value.trim();
    a[k] = v ? (k === "country" ? v.toUpperCase() : v) : null;
  }
  return Object.values(a).some((v) => v) ? a : null;
}

async function saveCard(event) {
  event.preventDefault();
  const form = $("#card-form");
  const error = $("#card-error");
  error.textContent = "";
  const name = form.cardholderName.value.trim() || null;
  const address = addressInput(form);
  try {
    await guarded(async () => {
      let cardId = editing?.id;
      if (!editing) {
        let pm = form.pm.value;
        if (config.gateway === "stripe") {
          // Stripe Elements: the card number goes to Stripe only. A SetupIntent saves it
          // for later off-session charges (3-D Secure now, if the bank asks).
          const setup = (await gql("StartCardSetup")).startCardSetup;
          if (setup.errors.length) throw new Error(setup.errors.map((e) => e.message).join(" "));
          // Stripe.js may show the bank's challenge over the page: a modal <dialog> would
          // leave it inert, so the dialog steps aside meanwhile.
          const dialog = $("#card-dialog");
          dialog.close();
          const { setupIntent, error: e } = await stripe.confirmCardSetup(setup.clientSecret, {
            payment_method: { card: cardElement, billing_details: { name: name ?? undefined } },
          }).finally(() => dialog.showModal());
          if (e) throw new Error(e.message || "The card could not be saved.");
          pm = typeof setupIntent.payment_method === "string" ? setupIntent.payment_method : setupIntent.payment_method.id;
        }
        const added = (await gql("AddCard",
          { pm, primary: form.makePrimary.checked })).addCard;
        if (added.errors.length) throw new Error(added.errors.map((e) => e.message).join(" "));
        cardId = added.card.id;
        if (!name && !address) { await reload(); $("#card-dialog").close(); return; }
      }
      const input = { cardId, cardholderName: name, billingAddress: address };
      if (editing) {
        input.expMonth = Number(form.expMonth.value);
        input.expYear = Number(form.expYear.value);
      }
      const payload = (await gql("UpdateCard", { input })).updateCard;
      if (payload.errors.length) throw new Error(payload.errors.map((e) => e.message).join(" "));
      await reload();
      $("#card-dialog").close();
      $("#cards-status").className = "small";
      $("#cards-status").textContent = editing ? "The card was updated." : "The card was added.";
    });
  } catch (err) {
    error.textContent = err.message;
    if (!editing) await reload().catch(() => {});
  }
}

// ---------------------------------------------------------------- Buy Purchase Credits

const purchase = { key: null, credits: 0, cardId: null, payment: null };
function step(name) {
  for (const s of document.querySelectorAll("#buy-form [data-step]")) s.hidden = s.dataset.step !== name;
  const first = $(`#buy-form [data-step="${name}"] button.primary, #buy-form [data-step="${name}"] input`);
  first?.focus();
}

function openBuy() {
  const p = state.pricing;
  const form = $("#buy-form");
  form.reset();
  form.credits.min = p.minPurchaseCredits;
  form.credits.max = p.maxPurchaseCredits;
  form.credits.value = Math.max(p.minPurchaseCredits, 500);
  $("#buy-range").textContent = `From ${credits(p.minPurchaseCredits)} to ${credits(p.maxPurchaseCredits)}; one credit costs ${money(p.centsPerCredit)}.`;
  const cards = state.account.cards;
  form.card.replaceChildren(...cards.map((c) => el("option", { value: c.id, selected: c.isPrimary }, `${cardWords(c)}${c.isPrimary ? " (primary)" : ""}`)));
  $("#buy-error").textContent = cards.length ? "" : "Add a credit card first (Payment Information › Add Credit Card).";
  updatePrice();
  $("#buy-dialog").showModal();
  step("amount");
}

function updatePrice() {
  const n = Number($("#buy-form").credits.value);
  $("#buy-price").textContent = Number.isInteger(n) && n > 0 ? money(n * state.pricing.centsPerCredit) : "–";
}

function reviewPurchase(event) {
  event.preventDefault();
  const form = $("#buy-form");
  const n = Number(form.credits.value);
  const p = state.pricing;
  if (!Number.isInteger(n) || n < p.minPurchaseCredits || n > p.maxPurchaseCredits) {
    $("#buy-error").textContent = `Enter a whole number of credits from ${numberFmt.format(p.minPurchaseCredits)} to ${numberFmt.format(p.maxPurchaseCredits)}.`;
    form.credits.focus();
    return;
  }
  if (!form.card.value) return;
  // A new attempt: a new idempotency key (a retry of this attempt reuses it).
  purchase.key = crypto.randomUUID();
  purchase.credits = n;
  purchase.cardId = form.card.value;
  const card = state.account.cards.find((c) => c.id === purchase.cardId);
  $("#buy-summary").textContent = `Buy ${credits(n)} for ${money(n * p.centsPerCredit)}, charged to ${cardWords(card)}?`;
  step("confirm");
}

function outcome(text, { retry = false, good = false } = {}) {
  const o = $("#buy-outcome");
  o.textContent = text;
  o.className = good ? "good" : "error";
  $("#buy-retry").hidden = !retry;
  step("outcome");
}

async function confirmPurchase() {
  const button = $("#buy-confirm");
  button.disabled = true;
  try {
    const payload = (await gql("PurchaseCredits",
      { input: { credits: purchase.credits, idempotencyKey: purchase.key, cardId: purchase.cardId } })).purchaseCredits;
    await settle(payload);
  } catch (err) {
    if (err instanceof SignInNeeded) { signIn(err.message); return; }
    if (err instanceof NetworkError) {
      outcome(`${err.message} Nothing is charged twice: try again to finish this purchase.`, { retry: true });
    } else outcome(err.message);
  } finally {
    button.disabled = false;
  }
}

async function settle(payload) {
  const payment = payload.payment;
  purchase.payment = payment;
  if (payment?.status === "SUCCEEDED") {
    renderBalance(payload.balance);
    outcome(`Done: ${credits(payment.credits)} added for ${money(payment.amountCents, payment.currency)}. Your balance is ${credits(payload.balance)}.`, { good: true });
    reload().catch(() => {});
    return;
  }
  if (payment?.status === "REQUIRES_ACTION") { await authenticate(payment); return; }
  if (payment?.status === "PENDING") {
    outcome("The bank has not answered yet. The credits are added as soon as it does.", { good: true });
    return;
  }
  const why = payload.errors.map((e) => e.message).join(" ") || payment?.failureMessage || "The purchase did not go through.";
  outcome(`The purchase did not go through: ${why} Nothing was charged. Try again with another card or a new attempt.`);
  reload().catch(() => {});
}

async function authenticate(payment) {
  purchase.payment = payment;
  if (!$("#buy-dialog").open) $("#buy-dialog").showModal();
  step("challenge");
  if (config.gateway === "stripe") {
    $("#sandbox-3ds").hidden = true;
    // Stripe.js shows the bank's challenge over the page; a modal <dialog> would leave it
    // inert, so the dialog steps aside until it is answered.
    $("#buy-dialog").close();
    try {
      const s = await loadStripe();
      await s.confirmCardPayment(payment.clientSecret);
    } catch (err) { /* the payment's own status says what happened */ }
    $("#buy-dialog").showModal();
    await finishAuthentication();
  } else {
    $("#sandbox-3ds").hidden = false;
    $("#approve-3ds").focus();
  }
}

async function sandboxAnswer(approve) {
  const response = await fetch("/sandbox/authenticate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ clientSecret: purchase.payment.clientSecret, approve }),
  });
  if (!response.ok && response.status !== 404) {
    outcome(`The authentication could not be sent (${response.status}).`);
    return;
  }
  await finishAuthentication();
}

async function finishAuthentication() {
  try {
    const payload = (await gql("ConfirmPurchase",
      { id: purchase.payment.id })).confirmPurchase;
    if (payload.payment?.status === "REQUIRES_ACTION") {
      outcome("The payment still waits for authentication. It is listed under Purchases waiting for authentication.");
      reload().catch(() => {});
      return;
    }
    await settle(payload);
  } catch (err) {
    if (err instanceof SignInNeeded) signIn(err.message);
    else outcome(err.message, { retry: false });
  }
}

function renderWaiting() {
  const waiting = state.account.payments.edges.map((e) => e.node);
  $("#waiting").hidden = waiting.length === 0;
  $("#waiting-list").replaceChildren(...waiting.map((p) => el("li", {},
    `${credits(p.credits)} for ${money(p.amountCents, p.currency)} on ${dateFmt.format(new Date(p.createdAt))} `,
    el("button", { type: "button", onclick: () => { purchase.key = null; authenticate(p); } }, "Finish authentication"))));
}

// ---------------------------------------------------------------- the gear

function openGear() {
  const a = state.account.autoRecharge;
  const form = $("#gear-form");
  form.reset();
  $("#gear-error").textContent = "";
  form.enabled.checked = a.enabled;
  form.trigger.value = a.trigger ?? "THRESHOLD";
  form.thresholdCredits.value = a.thresholdCredits ?? "";
  form.intervalDays.value = a.intervalDays ?? "";
  form.rechargeCredits.value = a.rechargeCredits ?? "";
  form.rechargeCredits.min = state.pricing.minPurchaseCredits;
  form.rechargeCredits.max = state.pricing.maxPurchaseCredits;
  const others = state.account.cards;
  form.cardId.replaceChildren(...others.map((c) => el("option", { value: c.id }, cardWords(c))));
  form.cardChoice.value = a.usePrimaryCard ? "primary" : "other";
  if (!a.usePrimaryCard && a.card) form.cardId.value = a.card.id;
  form.notify.checked = a.notify;
  form.notifyEmails.value = a.notifyEmails.join(", ");
  form.monthlyLimitCredits.value = a.monthlyLimitCredits ?? "";
  $("#gear-state").textContent = rechargeWords(a);
  $("#gear-dialog").showModal();
}

const numberOrNull = (input) => (input.value.trim() === "" ? null : Number(input.value));

async function saveGear(event) {
  event.preventDefault();
  const form = $("#gear-form");
  const primary = form.cardChoice.value === "primary";
  const input = {
    enabled: form.enabled.checked,
    trigger: form.trigger.value,
    thresholdCredits: numberOrNull(form.thresholdCredits),
    intervalDays: numberOrNull(form.intervalDays),
    rechargeCredits: numberOrNull(form.rechargeCredits),
    usePrimaryCard: primary,
    cardId: primary ? null : form.cardId.value || null,
    notify: form.notify.checked,
    notifyEmails: form.notifyEmails.value.split(",").map((s) => s.trim()).filter(Boolean),
    monthlyLimitCredits: numberOrNull(form.monthlyLimitCredits),
  };
  if (!input.enabled) {
    // Off keeps the configuration: send only the switch.
    for (const k of Object.keys(input)) if (k !== "enabled") delete input[k];
  }
  try {
    const payload = await guarded(async () => (await gql("UpdateAutoRecharge", { input })).updateAutoRecharge);
    if (!payload) return;
    if (payload.errors.length) {
      $("#gear-error").textContent = payload.errors.map((e) => e.message).join(" ");
      return;
    }
    state.account.autoRecharge = payload.autoRecharge;
    $("#recharge-state").textContent = rechargeWords(payload.autoRecharge);
    $("#gear-dialog").close();
    $("#gear").focus();
  } catch (err) {
    $("#gear-error").textContent = err.message;
  }
}

// ---------------------------------------------------------------- the low-balance e-mail

function openAlert() {
  const alert = state.account.lowBalanceAlert;
  const form = $("#alert-form");
  form.enabled.checked = alert.enabled;
  form.levelCredits.value = alert.levelCredits ?? "";
  $("#alert-error").textContent = "";
  $("#alert-dialog").showModal();
}

async function saveAlert(event) {
  event.preventDefault();
  const form = $("#alert-form");
  const input = { enabled: form.enabled.checked, levelCredits: numberOrNull(form.levelCredits) };
  try {
    const payload = await guarded(async () => (await gql("UpdateLowBalanceAlert", { input })).updateLowBalanceAlert);
    if (!payload) return;
    if (payload.errors.length) {
      $("#alert-error").textContent = payload.errors.map((e) => e.message).join(" ");
      return;
    }
    state.account.lowBalanceAlert = payload.lowBalanceAlert;
    renderAccount();
    $("#alert-dialog").close();
    $("#alert-edit").focus();
  } catch (err) {
    $("#alert-error").textContent = err.message;
  }
}

// ---------------------------------------------------------------- Manage Purchase Credits

function frame() {
  const form = $("#filters");
  const now = new Date();
  const startOfDay = (d) => new Date(d.getFullYear(), d.getMonth(), d.getDate());
  const tomorrow = new Date(startOfDay(now).getTime() + 86_400_000);
  switch (form.frame.value) {
    case "this-month": return [new Date(now.getFullYear(), now.getMonth(), 1), new Date(now.getFullYear(), now.getMonth() + 1, 1)];
    case "last-month": return [new Date(now.getFullYear(), now.getMonth() - 1, 1), new Date(now.getFullYear(), now.getMonth(), 1)];
    case "90": return [new Date(tomorrow.getTime() - 90 * 86_400_000), tomorrow];
    case "custom": {
      const from = form.from.value ? new Date(`${form.from.value}T00:00`) : new Date(tomorrow.getTime() - 30 * 86_400_000);
      const to = form.to.value ? new Date(new Date(`${form.to.value}T00:00`).getTime() + 86_400_000) : tomorrow;
      return [from, to];
    }
    default: return [new Date(tomorrow.getTime() - 30 * 86_400_000), tomorrow];
  }
}

function currentFilter() {
  const form = $("#filters");
  const [from, to] = frame();
  const filter = { from: from.toISOString(), to: to.toISOString() };
  if (form.search.value.trim()) filter.search = form.search.value.trim();
  if (form.type.value) filter.types = [form.type.value];
  if (form.process.value) filter.processTypes = [form.process.value];
  if (form.user.value) filter.userIds = [form.user.value];
  return filter;
}

async function loadHistory({ more = false } = {}) {
  const status = $("#report-status");
  const filter = currentFilter();
  if (filter.from >= filter.to) { status.textContent = "The start of the time frame must be before its end."; return; }
  status.textContent = "Loading…";
  const data = await guarded(() => gql("Transactions",
    { filter, after: more ? state.cursor : null }));
  if (!data) return;
  const page = data.creditAccount.transactions;
  const body = $("#history tbody");
  if (!more) body.replaceChildren();
  for (const { node: t } of page.edges) {
    if (t.user) state.users.set(t.user.userId, t.user);
    body.append(el("tr", {},
      el("td", {}, dateFmt.format(new Date(t.createdAt))),
      el("td", {}, words(t.type)),
      el("td", {}, processWords(t.processType)),
      el("td", {}, person(t.user)),
      el("td", {}, t.description + (t.reference ? ` (${t.reference})` : "")),
      el("td", { class: `num${t.credits < 0 ? " neg" : ""}` }, numberFmt.format(t.credits)),
      el("td", { class: "num" }, numberFmt.format(t.balanceAfter))));
  }
  state.cursor = page.pageInfo.endCursor;
  $("#more").hidden = !page.pageInfo.hasNextPage;
  const rows = body.children.length;
  status.textContent = rows ? `${numberFmt.format(rows)} transactions shown${page.pageInfo.hasNextPage ? "; more are available" : ""}.` : "No transactions in this time frame.";
  refreshUsers();
}

function refreshUsers() {
  const select = $("#filters").user;
  const chosen = select.value;
  const people = [...state.users.values()].sort((a, b) => person(a).localeCompare(person(b)));
  select.replaceChildren(el("option", { value: "" }, "All users"), ...people.map((u) => el("option", { value: u.userId }, person(u))));
  select.value = chosen;
}

async function loadUsage() {
  const [from, to] = frame();
  const data = await guarded(() => gql("Usage",
    { from: from.toISOString(), to: to.toISOString() }));
  if (!data) return;
  const buckets = data.creditAccount.usage;
  const days = [];
  for (let d = new Date(from); d < to; d = new Date(d.getFullYear(), d.getMonth(), d.getDate() + 1)) days.push(d);
  $("#chart").render(buckets, days, processWords);
  const totals = new Map();
  for (const b of buckets) {
    const t = totals.get(b.processType) ?? { units: 0, freeUnits: 0, credits: 0, meteredCents: 0 };
    for (const k of Object.keys(t)) t[k] += b[k];
    totals.set(b.processType, t);
  }
  const sum = [...totals.values()].reduce((a, t) => a + t.credits, 0);
  $("#usage-summary").textContent = `${credits(sum)} spent from ${dayFmt.format(from)} to ${dayFmt.format(new Date(to.getTime() - 1))}.`;
  $("#usage-table tbody").replaceChildren(...[...totals].map(([p, t]) => el("tr", { "data-process": p },
    el("th", { scope: "row" }, processWords(p)),
    el("td", { class: "num" }, numberFmt.format(t.units)),
    el("td", { class: "num" }, numberFmt.format(t.freeUnits)),
    el("td", { class: "num" }, numberFmt.format(t.credits)),
    el("td", { class: "num" }, t.meteredCents ? money(t.meteredCents) : ""))));
}

function refreshReport() {
  if ($("#report").hidden) return;
  loadHistory().catch((err) => { $("#report-status").textContent = err.message; });
  loadUsage().catch((err) => { $("#usage-summary").textContent = err.message; });
}

async function csv() {
  const filter = currentFilter();
  const params = new URLSearchParams({ from: filter.from, to: filter.to });
  if (filter.search) params.set("search", filter.search);
  if (filter.types) params.set("types", filter.types.join(","));
  if (filter.processTypes) params.set("processTypes", filter.processTypes.join(","));
  if (filter.userIds) params.set("userIds", filter.userIds.join(","));
  try {
    await guarded(() => downloadCsv(params, `purchase-credits-${filter.from.slice(0, 10)}.csv`));
  } catch (err) {
    $("#report-status").textContent = err.message;
  }
}

// ---------------------------------------------------------------- invoices

function invoiceState(invoice) {
  // Under the card payment minimum: never charged, added to next month's invoice.
  if (invoice.status === "CARRIED_FORWARD") return "under the minimum charge, carried into next month's invoice";
  return words(invoice.status);
}

function renderInvoices() {
  const list = state.account.invoices;
  $("#invoices").replaceChildren(...(list.length ? list.map((i) => el("li", {},
    `${monthFmt.format(new Date(i.periodStart))}: ${money(i.amountCents, i.currency)}, ${invoiceState(i)}${i.paidAt ? ` on ${dayFmt.format(new Date(i.paidAt))}` : ""}${i.carriedInCents ? ` (includes ${money(i.carriedInCents, i.currency)} carried from earlier months)` : ""}${i.failureMessage ? ` (${i.failureMessage})` : ""}`))
    : [el("li", { class: "muted" }, "No invoices yet.")]));
}

// ---------------------------------------------------------------- start

function wire() {
  $("#buy").addEventListener("click", openBuy);
  $("#buy-form").addEventListener("submit", reviewPurchase);
  $("#buy-form").credits.addEventListener("input", updatePrice);
  $("#buy-confirm").addEventListener("click", confirmPurchase);
  $("#buy-back").addEventListener("click", () => step("amount"));
  $("#buy-retry").addEventListener("click", () => { step("confirm"); confirmPurchase(); });
  $("#approve-3ds").addEventListener("click", () => sandboxAnswer(true));
  $("#fail-3ds").addEventListener("click", () => sandboxAnswer(false));
  $("#add-card").addEventListener("click", () => openCardDialog());
  $("#card-form").addEventListener("submit", saveCard);
  $("#gear").addEventListener("click", openGear);
  $("#gear-form").addEventListener("submit", saveGear);
  $("#alert-edit").addEventListener("click", openAlert);
  $("#alert-form").addEventListener("submit", saveAlert);
  for (const b of document.querySelectorAll("[data-close]")) {
    b.addEventListener("click", () => b.closest("dialog").close());
  }
  $("#buy-dialog").addEventListener("close", () => $("#buy").focus());
  $("#manage").addEventListener("click", () => {
    const report = $("#report");
    report.hidden = !report.hidden;
    $("#manage").setAttribute("aria-expanded", String(!report.hidden));
    if (!report.hidden) { refreshReport(); $("#report-title").setAttribute("tabindex", "-1"); $("#report-title").focus(); }
  });
  const form = $("#filters");
  form.type.append(...TX_TYPES.map((t) => el("option", { value: t }, words(t))));
  form.process.append(...Object.keys(PROCESS_WORDS).map((p) => el("option", { value: p }, processWords(p))));
  form.addEventListener("change", (e) => {
    if (e.target.name === "frame") for (const l of form.querySelectorAll(".custom")) l.hidden = form.frame.value !== "custom";
    if (e.target.name !== "search") refreshReport();
  });
  let typing;
  form.search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(refreshReport, 300); });
  form.addEventListener("submit", (e) => { e.preventDefault(); refreshReport(); });
  $("#more").addEventListener("click", () => loadHistory({ more: true }));
  $("#csv").addEventListener("click", csv);
}

async function start() {
  takeTokenFromFragment();
  if (!token()) { signIn("You are not signed in."); return; }
  wire();
  try {
    const who = await gql("Viewer");
    if (!who.viewer.roles.includes("ADMIN")) {
      $("#noadmin-who").textContent = `Signed in as ${person({ ...who.viewer })}. Billing questions: ${config.support}.`;
      show("#noadmin");
      return;
    }
    await reload();
  } catch (err) {
    if (err instanceof SignInNeeded) { signIn(err.message); return; }
    $("#loading").textContent = `The billing details could not be loaded: ${err.message}`;
    return;
  }
  show("#app");
  let refresh;
  liveBalance({
    onBalance: (change) => {
      renderBalance(change.balance);
      if (change.transaction) {
        clearTimeout(refresh);
        refresh = setTimeout(() => { reload().catch(() => {}); refreshReport(); }, 250);
      }
    },
    onState: (s) => { $("#live").textContent = s === "live" ? "Updated live." : "Reconnecting for live updates…"; },
    onExpired: () => signIn("Your session has expired."),
  });
  document.body.dataset.ready = "true";
}

start();
