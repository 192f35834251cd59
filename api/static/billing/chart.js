// <usage-chart>: credits spent per day, stacked by process type, as an SVG drawn here
// (a few dozen lines: no chart library is needed for one stacked bar chart).

const COLORS = ["#1f5fbf", "#d1495b", "#edae49", "#00798c", "#6a4c93", "#3d9970", "#8d6a9f", "#f28482"];

export class UsageChart extends HTMLElement {
  /** buckets: [{start, processType, credits, units, freeUnits, meteredCents}], days: [Date] */
  render(buckets, days, label) {
    const types = [...new Set(buckets.map((b) => b.processType))].sort();
    if (!types.length) {
      const none = document.createElement("p");
      none.className = "muted small";
      none.textContent = "No usage in this time frame.";
      this.replaceChildren(none);
      return;
    }
    const byDay = new Map(days.map((d) => [d.toDateString(), {}]));
    for (const b of buckets) {
      const key = new Date(b.start).toDateString();
      const row = byDay.get(key) ?? {};
      // Credits when the use cost any; else the units (free or metered) so they show too.
      row[b.processType] = (row[b.processType] ?? 0) + (b.credits || b.units);
      byDay.set(key, row);
    }
    const totals = [...byDay.values()].map((r) => Object.values(r).reduce((a, v) => a + v, 0));
    const max = Math.max(1, ...totals);
    const w = 640, h = 200, pad = 24;
    const step = (w - pad) / Math.max(1, byDay.size);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h + 20}`);
    svg.setAttribute("aria-hidden", "true");
    let i = 0;
    for (const [key, row] of byDay) {
      let y = h;
      types.forEach((t, n) => {
        const v = row[t] ?? 0;
        if (!v) return;
        const bh = (v / max) * (h - 10);
        const rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", String(pad + i * step + 1));
        rect.setAttribute("y", String(y - bh));
        rect.setAttribute("width", String(Math.max(1, step - 2)));
        rect.setAttribute("height", String(bh));
        rect.setAttribute("fill", COLORS[n % COLORS.length]);
        const title = document.createElementNS(ns, "title");
        title.textContent = `${key}: ${t} ${v}`;
        rect.append(title);
        svg.append(rect);
        y -= bh;
      });
      i += 1;
    }
    const axis = document.createElementNS(ns, "text");
    axis.setAttribute("x", "0");
    axis.setAttribute("y", "12");
    axis.setAttribute("font-size", "11");
    axis.textContent = String(max);
    svg.append(axis);
    const legend = document.createElement("p");
    legend.className = "legend";
    types.forEach((t, n) => {
      const s = document.createElement("span");
      s.style.setProperty("--c", COLORS[n % COLORS.length]);
      s.textContent = label(t);
      legend.append(s);
    });
    this.replaceChildren(svg, legend);
  }
}
customElements.define("usage-chart", UsageChart);
