// Neruba support console. Plain JavaScript, no build step, no third-party code.
//
// Rules this file keeps:
// - every number shown is a string the api answered, shown as it came: money and quantities
//   are exact decimals and are never added, rounded or reformatted here (a chart turns a
//   quantity into a pixel position, nothing more);
// - the keys live in sessionStorage only and travel as `Authorization: Bearer`; never in a
//   URL, never in localStorage or a cookie;
// - text from the api goes into the page with textContent, never as HTML.
'use strict';

(() => {
  const READ_KEY = 'neruba.console.read-key';
  const CREDITS_KEY = 'neruba.console.credits-key';
  const MAX_PAGE = 1000;
  // A grant's priority when none is sent (SPEC: 0–1000, default 10, lower burns first).
  const DEFAULT_PRIORITY = 10;
  // Most lines a statements page holds: the console shows a statement whole up to it.
  const MAX_STATEMENT_LINES = 10000;
  // Most rows of usage one chart draws (a page of the usage read).
  const USAGE_CHART_ROWS = 10000;
  // An RFC 3339 time with a `T` and seconds, which `Date.parse` reads as the gateway does once
  // its fields are a real date and time (`realTime`).
  const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$/i;

  const $ = (id) => document.getElementById(id);

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'text') node.textContent = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return node;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === 'text') node.textContent = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function say(message) {
    $('status').textContent = message;
  }

  function alarm(message) {
    const alert = $('alert');
    alert.textContent = message || '';
    alert.hidden = !message;
  }

  function errorText(answer) {
    const e = answer && answer.data && answer.data.error;
    if (e && e.code) return `${e.code}: ${e.message || ''}`;
    return `HTTP ${answer.status}`;
  }

  /** A call to this origin with `key`; the answer's status and JSON body. */
  async function call(path, key, options) {
    const opts = options || {};
    const headers = { Accept: 'application/json', Authorization: `Bearer ${key}` };
    let body;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    let response;
    try {
      response = await fetch(path, {
        method: opts.method || 'GET',
        headers,
        body,
        cache: 'no-store',
        credentials: 'omit',
        referrerPolicy: 'no-referrer',
      });
    } catch (e) {
      return { status: 0, ok: false, data: { error: { code: 'network', message: String(e) } } };
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = { error: { code: 'not_json', message: text.slice(0, 200) } };
    }
    return { status: response.status, ok: response.ok, data };
  }

  const readKey = () => sessionStorage.getItem(READ_KEY);
  const creditsKey = () => sessionStorage.getItem(CREDITS_KEY);
  const read = (path) => call(path, readKey());

  const enc = encodeURIComponent;
  const customerPath = (customer, rest) => `/v1/customers/${enc(customer)}${rest}`;

  function query(pairs) {
    const parts = [];
    for (const [name, value] of pairs) {
      if (value !== undefined && value !== null && value !== '') parts.push(`${enc(name)}=${enc(value)}`);
    }
    return parts.length ? `?${parts.join('&')}` : '';
  }

  function groupText(group) {
    const entries = Object.entries(group || {});
    return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join(', ') : '—';
  }

  function groupKey(group) {
    return JSON.stringify(Object.entries(group || {}));
  }

  /** A window as `2026-11-28 16:59–17:00` (UTC; the exact times are in its title). */
  function windowText(item) {
    const start = item.window_start.slice(0, 16).replace('T', ' ');
    const sameDay = item.window_end.slice(0, 10) === item.window_start.slice(0, 10);
    const end = sameDay ? item.window_end.slice(11, 16) : item.window_end.slice(0, 16).replace('T', ' ');
    return `${start}–${end} UTC`;
  }

  const shortId = (id) => (id && id.length > 14 ? `${id.slice(0, 11)}…` : id || '');

  /**
   * A first page's `as_of` as a `min_position`: each partition's last record applied. Later
   * pages of the same read carry it, so another api replica, further behind, waits until it
   * is as new as the first page's instead of answering a page short (and ending the list).
   */
  function pinOf(asOf) {
    const applied = (asOf || [])
      .filter((p) => p.next_offset > 0)
      .map((p) => `${p.topic}:${p.partition}:${p.next_offset - 1}`);
    return applied.length ? applied.join(',') : null;
  }

  function asOfText(asOf) {
    return (asOf || []).map((p) => `${p.topic}:${p.partition}:${p.next_offset}`).join(', ');
  }

  function table(caption, headers, rows, attrs) {
    return el('table', attrs || {},
      el('caption', { text: caption }),
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col', text: h })))),
      el('tbody', {}, rows));
  }

  function num(text, testid, extra) {
    return el('td', Object.assign({ class: 'num', 'data-testid': testid, text }, extra || {}));
  }

  // ---- session -------------------------------------------------------------------------

  const session = { read: null, credits: null };

  async function signIn(event) {
    event.preventDefault();
    alarm('');
    const readValue = $('read-key').value.trim();
    const creditsValue = $('credits-key').value.trim();
    say('Checking the keys…');
    const who = await call('/console/session', readValue);
    if (!who.ok) {
      alarm(`The read key was refused (${errorText(who)}).`);
      say('');
      return;
    }
    if (!(who.data.scopes || []).includes('read')) {
      alarm(`Key ${who.data.key_name} has no read scope: the console needs one to read.`);
      say('');
      return;
    }
    if (creditsValue) {
      const credits = await call('/console/session', creditsValue);
      if (!credits.ok || !(credits.data.scopes || []).includes('credits')) {
        alarm('The credits key was refused or lacks the credits scope.');
        say('');
        return;
      }
      if (credits.data.tenant !== who.data.tenant) {
        alarm('The two keys belong to different tenants.');
        say('');
        return;
      }
      sessionStorage.setItem(CREDITS_KEY, creditsValue);
    } else {
      sessionStorage.removeItem(CREDITS_KEY);
    }
    sessionStorage.setItem(READ_KEY, readValue);
    $('read-key').value = '';
    $('credits-key').value = '';
    await restore();
    say(`Signed in to tenant ${session.read.tenant}.`);
    route();
  }

  /** Re-checks the stored keys (a reload keeps the session within the tab). */
  async function restore() {
    session.read = null;
    session.credits = null;
    if (!readKey()) return;
    const who = await call('/console/session', readKey());
    if (!who.ok) {
      sessionStorage.removeItem(READ_KEY);
      sessionStorage.removeItem(CREDITS_KEY);
      return;
    }
    session.read = who.data;
    if (creditsKey()) {
      const credits = await call('/console/session', creditsKey());
      if (credits.ok && (credits.data.scopes || []).includes('credits') && credits.data.tenant === who.data.tenant) {
        session.credits = credits.data;
      }
    }
    const keys = [`${session.read.key_name} (read)`];
    if (session.credits) keys.push(`${session.credits.key_name} (credits)`);
    $('who').textContent = `Tenant ${session.read.tenant} · keys ${keys.join(', ')}`;
    $('who').hidden = false;
    $('sign-out').hidden = false;
  }

  function signOut() {
    sessionStorage.removeItem(READ_KEY);
    sessionStorage.removeItem(CREDITS_KEY);
    session.read = null;
    session.credits = null;
    $('who').hidden = true;
    $('sign-out').hidden = true;
    say('Signed out; the keys are forgotten.');
    location.hash = '#/';
    route();
  }

  // ---- routing -------------------------------------------------------------------------

  function show(id) {
    for (const section of ['sign-in', 'customers', 'customer']) $(section).hidden = section !== id;
  }

  function parseHash() {
    const hash = location.hash.replace(/^#/, '');
    const match = /^\/customers\/([^?]+)(?:\?period=(\d{4}-\d{2}))?$/.exec(hash);
    if (match) {
      try {
        return { customer: decodeURIComponent(match[1]), period: match[2] };
      } catch (e) {
        return {};
      }
    }
    return {};
  }

  function currentMonth() {
    return new Date().toISOString().slice(0, 7);
  }

  function route() {
    if (!session.read) {
      show('sign-in');
      $('read-key').focus();
      return;
    }
    const { customer, period } = parseHash();
    if (customer) {
      show('customer');
      openCustomer(customer, period || currentMonth());
    } else {
      show('customers');
      loadCustomers(true);
    }
  }

  // ---- customers -----------------------------------------------------------------------

  const list = { cursor: null, ids: [], at: null };

  async function loadCustomers(fresh) {
    if (fresh) {
      list.cursor = null;
      list.ids = [];
      list.at = null;
    }
    say('Reading customers…');
    const answer = await read(`/v1/customers${query([['limit', 100], ['cursor', list.cursor], ['min_position', list.at]])}`);
    if (!answer.ok) {
      alarm(`Customers could not be read (${errorText(answer)}).`);
      return;
    }
    if (fresh) list.at = pinOf(answer.data.as_of);
    list.ids.push(...answer.data.customers.map((c) => c.id));
    list.cursor = answer.data.next_cursor;
    renderCustomers();
    say(`${list.ids.length} customer(s) of tenant ${session.read.tenant}.`);
  }

  function renderCustomers() {
    const filter = $('customer-query').value.trim().toLowerCase();
    const shown = list.ids.filter((id) => id.toLowerCase().includes(filter));
    $('customer-list').replaceChildren(...shown.map((id) =>
      el('li', {}, el('a', { href: `#/customers/${enc(id)}`, 'data-testid': 'customer-link', text: id }))));
    $('customer-empty').hidden = list.ids.length > 0;
    $('customer-more').hidden = !list.cursor;
  }

  // ---- one customer --------------------------------------------------------------------

  const view = { customer: null, period: null, items: [], itemsCursor: null, itemsAt: null, entriesAfter: null, entriesAt: null, grantKey: null };

  async function openCustomer(customer, period) {
    view.customer = customer;
    view.period = period;
    $('customer-id').textContent = customer;
    $('period').value = period;
    $('explanation').hidden = true;
    $('write-answer').hidden = true;
    alarm('');
    await loadCustomer();
  }

  async function loadCustomer(minPosition) {
    const { customer, period } = view;
    $('customer').setAttribute('data-loaded', 'false');
    say(`Reading ${customer} for ${period}…`);
    const at = [['min_position', minPosition]];
    const [statements, items, balances, grants, entries] = await Promise.all([
      read(customerPath(customer, `/statements/${enc(period)}${query([['limit', MAX_STATEMENT_LINES]].concat(at))}`)),
      read(customerPath(customer, `/line-items${query([['period', period], ['limit', MAX_PAGE]])}`)),
      read(customerPath(customer, `/balances${query(at)}`)),
      read(customerPath(customer, `/grants${query(at)}`)),
      read(customerPath(customer, `/balance-entries${query([['limit', 100]].concat(at))}`)),
    ]);
    if (view.customer !== customer || view.period !== period) return;
    const missing = [statements, items, balances, grants, entries].find((a) => a.status === 404);
    if (missing) {
      for (const id of ['statements', 'usage', 'balances', 'grants', 'entries', 'items']) $(id).replaceChildren();
      $('grant-form').hidden = true;
      alarm(`No customer ${customer} for tenant ${session.read.tenant}.`);
      say('');
      $('customer-id').setAttribute('data-found', 'false');
      $('customer').setAttribute('data-loaded', 'true');
      return;
    }
    $('customer-id').setAttribute('data-found', 'true');
    const failed = [statements, items, balances, grants, entries].find((a) => !a.ok);
    if (failed) alarm(`A read failed (${errorText(failed)}).`);
    $('as-of').textContent = statements.ok ? asOfText(statements.data.as_of) : '';
    if (statements.ok) renderStatements(statements.data);
    if (items.ok) {
      view.items = items.data.items;
      view.itemsCursor = items.data.next_cursor;
      view.itemsAt = pinOf(items.data.as_of);
      renderItems();
    }
    if (balances.ok) renderBalances(balances.data);
    if (grants.ok) renderGrants(grants.data);
    if (entries.ok) {
      $('entries').replaceChildren();
      view.entriesAt = pinOf(entries.data.as_of);
      appendEntries(entries.data);
    }
    renderGrantForm();
    say(`Customer ${customer}, period ${period}: read.`);
    if (statements.ok && items.ok) await loadUsage(statements.data, view.items);
    if (view.customer === customer && view.period === period) $('customer').setAttribute('data-loaded', 'true');
  }

  async function reloadMoney(minPosition) {
    const { customer } = view;
    const at = [['min_position', minPosition]];
    const [balances, grants, entries, statements] = await Promise.all([
      read(customerPath(customer, `/balances${query(at)}`)),
      read(customerPath(customer, `/grants${query(at)}`)),
      read(customerPath(customer, `/balance-entries${query([['limit', 100]].concat(at))}`)),
      read(customerPath(customer, `/statements/${enc(view.period)}${query([['limit', MAX_STATEMENT_LINES]].concat(at))}`)),
    ]);
    const failed = [balances, grants, entries, statements].find((a) => !a.ok);
    if (failed) {
      alarm(`Reading the write back failed (${errorText(failed)}).`);
      return false;
    }
    renderBalances(balances.data);
    renderGrants(grants.data);
    $('entries').replaceChildren();
    view.entriesAt = pinOf(entries.data.as_of);
    appendEntries(entries.data);
    renderStatements(statements.data);
    $('as-of').textContent = asOfText(statements.data.as_of);
    return true;
  }

  // ---- statement -----------------------------------------------------------------------

  function renderStatements(data) {
    const box = $('statements');
    const parts = [];
    if (!data.statements.length) {
      parts.push(el('p', { 'data-testid': 'statement-none', text: `No statement for ${data.period} yet (no billed usage).` }));
    }
    for (const st of data.statements) {
      const cur = st.currency;
      const rows = st.lines.map((line) => el('tr', { 'data-testid': 'statement-line', 'data-meter': line.meter, 'data-group': groupKey(line.group) },
        el('th', { scope: 'row', text: line.meter }),
        el('td', { text: groupText(line.group) }),
        num(line.quantity, 'statement-line-quantity'),
        num(`${line.amount} ${cur}`, 'statement-line-amount', { 'data-value': line.amount }),
        num(`${line.credit_applied} ${cur}`, 'statement-line-credit-applied'),
        num(`${line.amount_due} ${cur}`, 'statement-line-amount-due')));
      const prior = st.prior_period.map((line) => el('tr', { 'data-testid': 'statement-prior-line' },
        el('th', { scope: 'row', text: `${line.meter} (period from ${line.period_start})` }),
        el('td', { text: groupText(line.group) }),
        num(line.quantity, 'statement-prior-quantity'),
        num(`${line.amount} ${cur}`, 'statement-prior-amount'),
        num(`${line.credit_applied} ${cur}`, 'statement-prior-credit-applied'),
        num(`${line.amount_due} ${cur}`, 'statement-prior-amount-due')));
      const total = (label, value, testid) => el('div', {},
        el('dt', { text: label }),
        el('dd', { 'data-testid': testid, 'data-value': value, text: `${value} ${cur}` }));
      parts.push(el('article', { class: 'card statement', 'data-testid': `statement-${cur}`, 'aria-label': `Statement in ${cur}` },
        el('h4', {}, `${cur} · `,
          el('span', { class: `badge ${st.status}`, 'data-testid': `statement-${cur}-status`, text: st.status })),
        el('p', { class: 'help', text: `${st.period_start} to ${st.period_end} · ${st.id}` }),
        table(`Usage billed in ${cur}, per meter and group`, ['Meter', 'Group', 'Quantity', 'Amount', 'Credit applied', 'Amount due'], rows.concat(prior)),
        el('dl', { class: 'totals' },
          total('Usage', st.usage, `statement-${cur}-usage`),
          total('Prior-period adjustments', st.prior_period_amount, `statement-${cur}-prior`),
          total('Credit applied', st.credit_applied, `statement-${cur}-credit-applied`),
          total('Amount due', st.amount_due, `statement-${cur}-amount-due`))));
    }
    for (const pending of data.pending_prior_period || []) {
      parts.push(el('p', { class: 'help', 'data-testid': 'pending-prior' },
        `Corrections of earlier, final periods waiting for the next ${pending.currency} statement: ${pending.amount} ${pending.currency} (credit ${pending.credit_applied}, due ${pending.amount_due}).`));
    }
    if (data.next_cursor) {
      parts.push(el('p', { class: 'help', 'data-testid': 'statement-more-lines' },
        'The statements have more lines than one page holds (10,000): the lines shown are the first; the totals are every line\'s.'));
    }
    box.replaceChildren(...parts);
  }

  // ---- usage chart ---------------------------------------------------------------------

  const COLOURS = ['#2458a6', '#c2410c', '#15803d', '#7e22ce', '#b91c1c', '#0e7490'];

  async function loadUsage(statements, items) {
    // The meters this period bills, each over its billing period as the items give it.
    const meters = new Map();
    for (const item of items) {
      if (!meters.has(item.meter)) meters.set(item.meter, { from: item.period_start, to: item.period_end });
    }
    for (const st of statements.statements) {
      for (const line of st.lines) {
        if (!meters.has(line.meter)) meters.set(line.meter, { from: st.period_start, to: st.period_end });
      }
    }
    const box = $('usage');
    if (!meters.size) {
      box.replaceChildren(el('p', { 'data-testid': 'usage-none', text: 'No metered usage in this period.' }));
      return;
    }
    const charts = [];
    for (const [meter, range] of meters) charts.push(await usageFigure(meter, range, ''));
    if (view.customer === statements.customer) box.replaceChildren(...charts);
  }

  /** One meter's usage over `range`, bucketed by `window` ('' for the meter's own). */
  async function usageFigure(meter, range, window) {
    const answer = await read(`/v1/usage${query([['customer', view.customer], ['meter', meter], ['from', range.from], ['to', range.to], ['window', window], ['limit', USAGE_CHART_ROWS]])}`);
    const picker = el('select', { id: `usage-window-${meter}`, 'data-testid': `usage-window-${meter}` },
      [['', "the meter's window"], ['hour', 'hour'], ['day', 'day']].map(([value, label]) =>
        el('option', { value, selected: value === window, text: label })));
    picker.addEventListener('change', async () => {
      const figure = await usageFigure(meter, range, picker.value);
      document.getElementById(`usage-${meter}`).replaceWith(figure);
      const again = document.getElementById(`usage-window-${meter}`);
      if (again) again.focus();
    });
    const controls = el('p', { class: 'inline' }, el('label', { for: `usage-window-${meter}`, text: `Windows of ${meter}: ` }), picker);
    if (!answer.ok) {
      return el('figure', { class: 'card', id: `usage-${meter}` }, controls,
        el('p', { class: 'alert-inline', text: `Usage of ${meter} could not be read (${errorText(answer)}).` }));
    }
    const figure = chart(answer.data);
    figure.id = `usage-${meter}`;
    figure.querySelector('figcaption').after(controls);
    if (answer.data.next_cursor) {
      // More rows than a chart can show: the first page, and how to see the whole range.
      controls.after(el('p', { class: 'alert-inline', 'data-testid': `usage-more-${meter}`,
        text: `The chart shows the first ${answer.data.data.length} rows (windows and groups) of more: pick a longer window, if there is one, or read the rest through the api (GET /v1/usage, next_cursor).` }));
    }
    return figure;
  }

  /** One meter's windows as an SVG chart: a line and a point per window and group. */
  function chart(usage) {
    const W = 720;
    const H = 240;
    const pad = { l: 64, r: 16, t: 16, b: 40 };
    const series = new Map();
    for (const row of usage.data) {
      const key = groupKey(row.group);
      if (!series.has(key)) series.set(key, { group: row.group, rows: [] });
      series.get(key).rows.push(row);
    }
    // The x axis spans the windows answered (a month of one-minute windows would otherwise
    // crowd a day's usage into a few pixels); the caption says the whole range asked for.
    let from = Date.parse(usage.from);
    let to = Date.parse(usage.to);
    if (usage.data.length) {
      from = Math.min(...usage.data.map((r) => Date.parse(r.window_start)));
      to = Math.max(...usage.data.map((r) => Date.parse(r.window_end)));
    }
    const stamp = (ms) => new Date(ms).toISOString().slice(0, 16).replace('T', ' ');
    // Geometry only: the largest quantity sets the scale; labels show the api's strings.
    let top = usage.data[0];
    for (const row of usage.data) if (Number(row.quantity) > Number(top ? top.quantity : 0)) top = row;
    const max = top ? Math.max(Number(top.quantity), 1e-9) : 1;
    const x = (t) => pad.l + ((t - from) / Math.max(to - from, 1)) * (W - pad.l - pad.r);
    const y = (q) => H - pad.b - (Math.max(Number(q), 0) / max) * (H - pad.t - pad.b);
    const title = `${usage.meter}: ${usage.aggregation} per ${usage.window} window, ${usage.from} to ${usage.to}`;
    const plot = svg('svg', {
      viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title}; ${usage.data.length} window(s)`,
      class: 'chart', 'data-testid': `usage-chart-${usage.meter}`, 'data-points': usage.data.length,
    });
    plot.append(svg('line', { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, class: 'axis' }));
    plot.append(svg('line', { x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b, class: 'axis' }));
    plot.append(svg('text', { x: pad.l - 6, y: H - pad.b, 'text-anchor': 'end', class: 'tick', text: '0' }));
    if (top) plot.append(svg('text', { x: pad.l - 6, y: pad.t + 10, 'text-anchor': 'end', class: 'tick', text: top.quantity }));
    plot.append(svg('text', { x: pad.l, y: H - 12, class: 'tick', text: stamp(from) }));
    plot.append(svg('text', { x: W - pad.r, y: H - 12, 'text-anchor': 'end', class: 'tick', text: stamp(to) }));
    const legend = [];
    let index = 0;
    for (const { group, rows } of series.values()) {
      const colour = COLOURS[index % COLOURS.length];
      index += 1;
      const mid = (r) => x((Date.parse(r.window_start) + Date.parse(r.window_end)) / 2);
      const points = rows.map((r) => `${mid(r).toFixed(1)},${y(r.quantity).toFixed(1)}`);
      if (rows.length > 1) plot.append(svg('polyline', { points: points.join(' '), fill: 'none', stroke: colour, 'stroke-width': 2 }));
      for (const r of rows) {
        plot.append(svg('circle', {
          cx: mid(r).toFixed(1), cy: y(r.quantity).toFixed(1), r: 4, fill: colour,
          'data-testid': 'usage-point', 'data-quantity': r.quantity, 'data-window-start': r.window_start,
          'data-group': groupKey(r.group),
        }, svg('title', { text: `${r.window_start}: ${r.quantity} (${r.events} events) ${groupText(r.group)}` })));
      }
      legend.push(el('li', {}, el('span', { class: 'swatch', style: undefined, 'data-colour': colour }), groupText(group)));
    }
    const rows = usage.data.map((r) => el('tr', {},
      el('td', { text: r.window_start }), el('td', { text: groupText(r.group) }),
      num(r.quantity, 'usage-row-quantity'), el('td', { class: 'num', text: String(r.events) })));
    const figure = el('figure', { class: 'card' },
      el('figcaption', { text: title }),
      plot,
      el('ul', { class: 'legend' }, legend),
      el('details', {}, el('summary', { text: `The ${usage.data.length} window(s) as a table` }),
        table(`Usage of ${usage.meter}`, ['Window start', 'Group', 'Quantity', 'Events'], rows)));
    // Swatch colours via the DOM, not inline style attributes (the policy allows no inline style).
    for (const swatch of figure.querySelectorAll('.swatch')) swatch.style.background = swatch.getAttribute('data-colour');
    return figure;
  }

  // ---- balances and grants -------------------------------------------------------------

  function renderBalances(data) {
    if (!data.balances.length) {
      $('balances').replaceChildren(el('p', { 'data-testid': 'balances-none', text: 'No credit balance.' }));
      return;
    }
    const rows = data.balances.map((b) => el('tr', { 'data-testid': 'balance-row', 'data-currency': b.currency },
      el('th', { scope: 'row', text: b.currency }),
      num(b.balance, `balance-${b.currency}`),
      num(b.available, `available-${b.currency}`),
      num(String(b.active_grants), `active-grants-${b.currency}`),
      el('td', { text: b.rule ? `below ${b.rule.low_balance_threshold}${b.rule.below_threshold ? ' (now below)' : ''}` : '—' }),
      el('td', {}, b.outstanding_request ? el('code', { title: b.outstanding_request, text: shortId(b.outstanding_request), 'data-testid': `topup-${b.currency}` }) : '—')));
    $('balances').replaceChildren(table('Balance per currency', ['Currency', 'Balance', 'Available now', 'Grants with credit', 'Low-balance rule', 'Top-up requested'], rows));
  }

  function renderGrants(data) {
    const canVoid = !!session.credits && !!session.read && session.read.writes;
    const rows = data.grants.map((g) => {
      const actions = el('td', {});
      if (canVoid && g.status === 'active') actions.append(voidButton(g));
      return el('tr', { 'data-testid': 'grant-row', 'data-grant-id': g.id, 'data-grant-key': g.key },
        el('th', { scope: 'row' }, el('code', { title: g.id, text: shortId(g.id) })),
        el('td', { text: g.key }),
        num(`${g.amount}`, 'grant-amount'),
        num(`${g.remaining}`, 'grant-remaining'),
        el('td', { text: g.currency }),
        num(String(g.priority), 'grant-priority'),
        el('td', { 'data-testid': 'grant-expires', text: g.expires_at || 'never' }),
        el('td', {}, el('span', { class: `badge ${g.status}`, 'data-testid': 'grant-status', text: g.status })),
        actions);
    });
    const parts = [rows.length
      ? table('Grants, in the order usage draws on them', ['Grant', 'Key', 'Amount', 'Remaining', 'Currency', 'Priority', 'Expires', 'Status', 'Actions'], rows)
      : el('p', { text: 'No grants.' })];
    if (data.next_cursor) {
      parts.push(el('p', { class: 'help', 'data-testid': 'grants-more' },
        `The customer has more grants than one page holds: the first ${rows.length}, in the order usage draws on them, are shown; the balances above count every grant. The api's grants read has the rest, page by page (next_cursor).`));
    }
    $('grants').replaceChildren(...parts);
  }

  function voidButton(grant) {
    const button = el('button', { type: 'button', class: 'danger', 'data-testid': 'void-button', text: 'Void…' });
    let armed = false;
    button.addEventListener('click', async () => {
      if (!armed) {
        armed = true;
        button.textContent = `Confirm: void what is left (${grant.remaining} ${grant.currency})`;
        setTimeout(() => {
          armed = false;
          button.textContent = 'Void…';
        }, 8000);
        return;
      }
      button.disabled = true;
      const what = `Void of ${grant.id}`;
      const written = await write(`/console/gateway${customerPath(view.customer, `/grants/${enc(grant.id)}/void`)}`, undefined, what);
      if (written && written.readBack) say(`${what}: accepted at ${written.minPosition}, and read back.`);
    });
    return button;
  }

  function renderGrantForm() {
    const form = $('grant-form');
    form.hidden = !(session.credits && session.read && session.read.writes);
    if (!view.grantKey) newGrantKey();
  }

  function newGrantKey() {
    view.grantKey = `console-${crypto.randomUUID()}`;
    $('grant-key').textContent = view.grantKey;
  }

  async function submitGrant(event) {
    event.preventDefault();
    const amount = $('grant-amount').value.trim();
    if (!/^[0-9]+(\.[0-9]+)?$/.test(amount)) {
      alarm('The amount must be an exact decimal such as 25.00.');
      $('grant-amount').focus();
      return;
    }
    const body = {
      key: view.grantKey,
      amount,
      currency: $('grant-currency').value.trim(),
    };
    // Left blank, the gateway's default (10) applies, as for a grant sent without one.
    const priority = $('grant-priority').value.trim();
    if (priority) body.priority = Number(priority);
    const expires = $('grant-expires').value.trim();
    if (expires) {
      // Sent as the gateway keeps it (UTC with milliseconds), so the grant read back compares
      // with what was sent; a time the browser cannot read the same way is refused here.
      const ms = realTime(expires);
      if (Number.isNaN(ms)) {
        alarm('Expires at must be an RFC 3339 time such as 2027-01-01T00:00:00Z.');
        $('grant-expires').focus();
        return;
      }
      body.expires_at = new Date(ms).toISOString();
    }
    const note = $('grant-note').value.trim();
    if (note) body.metadata = { note };
    const what = `Grant ${view.grantKey}`;
    $('grant-submit').disabled = true;
    const written = await write(`/console/gateway${customerPath(view.customer, '/grants')}`, body, what);
    const outcome = written && await grantOutcome(body, written.answer.data.id, written.minPosition);
    $('grant-submit').disabled = false;
    if (!outcome) return;
    showOutcome(outcome);
    const at = `accepted at ${written.minPosition}`;
    if (outcome.kind === 'applied') {
      if (written.readBack) say(`${what}: ${at}, applied, and read back.`);
      $('grant-amount').value = '';
      $('grant-note').value = '';
      newGrantKey();
    } else if (outcome.kind === 'refused') {
      say(`${what}: ${at}, but the balances stage refused it (${outcome.code}).`);
      alarm(`${what} was refused by the balances stage (${outcome.message}).`);
      // A key that holds another grant can never apply these terms; a grant refused for the
      // bound applies if the same request is sent again once the customer has room.
      if (outcome.code === 'key_conflict') newGrantKey();
    } else {
      say(`${what}: ${at}; whether it applied is not known yet.`);
      alarm(`${what} could not be read back (${outcome.message}); sending the form again is safe: it keeps the same key.`);
    }
  }

  /**
   * `text` (RFC 3339) in milliseconds, or NaN: also when its fields are not a real date and
   * time, which `Date.parse` would roll over (2027-02-30 to March 2, 24:00 to the next day)
   * where the gateway refuses them.
   */
  function realTime(text) {
    const m = RFC3339.exec(text);
    if (!m) return Number.NaN;
    const [y, mo, d, h, mi, sec] = m.slice(1, 7).map(Number);
    const fields = new Date(Date.UTC(2000, mo - 1, d, h, mi, sec));
    fields.setUTCFullYear(y);
    const real = fields.getUTCFullYear() === y && fields.getUTCMonth() === mo - 1 && fields.getUTCDate() === d
      && fields.getUTCHours() === h && fields.getUTCMinutes() === mi && fields.getUTCSeconds() === sec;
    return real ? Date.parse(text) : Number.NaN;
  }

  /**
   * What the balances stage made of a grant the gateway accepted, read at the write's
   * position: applied; refused past the customer's bound of grants holding credit (the api
   * answers `grant_refused`); refused as `key_conflict` (the key already holds a grant with
   * other terms, which is what reads back); or not known (the read failed).
   */
  async function grantOutcome(sent, id, minPosition) {
    const answer = await read(customerPath(view.customer, `/grants/${enc(id)}${query([['min_position', minPosition]])}`));
    const error = answer.data && answer.data.error;
    if (answer.status === 404 && error && error.code === 'grant_refused') {
      return { kind: 'refused', code: error.code, message: errorText(answer) };
    }
    if (!answer.ok) return { kind: 'unknown', message: errorText(answer) };
    const held = answer.data.grant;
    if (sameTerms(held, sent)) return { kind: 'applied' };
    return {
      kind: 'refused',
      code: 'key_conflict',
      message: `key_conflict: key ${sent.key} already holds grant ${id}, of ${held.amount} ${held.currency} and other terms than these; nothing changed, and the form has a new key`,
    };
  }

  function showOutcome(outcome) {
    const line = $('write-outcome');
    line.setAttribute('data-outcome', outcome.kind);
    line.setAttribute('data-code', outcome.code || '');
    line.textContent = {
      applied: 'Balances stage: applied.',
      refused: `Balances stage: refused (${outcome.code}).`,
      unknown: 'Balances stage: not known yet.',
    }[outcome.kind];
  }

  /** Whether the grant read back has the terms sent, as the balances stage compares them. */
  function sameTerms(held, sent) {
    const decimal = (text) => {
      const [whole, fraction = ''] = String(text).split('.');
      const f = fraction.replace(/0+$/, '');
      return `${whole.replace(/^0+(?=[0-9])/, '')}${f ? `.${f}` : ''}`;
    };
    return held.key === sent.key
      && decimal(held.amount) === decimal(sent.amount)
      && held.currency === sent.currency
      && held.priority === (sent.priority ?? DEFAULT_PRIORITY)
      && !held.effective_at
      && !held.paid
      && (held.expires_at || null) === (sent.expires_at || null)
      && JSON.stringify(held.metadata || {}) === JSON.stringify(sent.metadata || {});
  }

  /**
   * A credit write through the api to the gateway; then the page reads its own write. The
   * gateway's answer and the write's position, or null when the gateway refused it.
   */
  async function write(path, body, what) {
    alarm('');
    say(`${what}: sending…`);
    const answer = await call(path, creditsKey(), { method: 'POST', body });
    $('write-answer').hidden = false;
    $('write-answer-body').textContent = `HTTP ${answer.status}\n${JSON.stringify(answer.data, null, 2)}`;
    $('write-outcome').textContent = '';
    $('write-outcome').removeAttribute('data-outcome');
    if (!answer.ok) {
      alarm(`${what} was refused (${errorText(answer)}).`);
      say('');
      return null;
    }
    const p = answer.data.position;
    const minPosition = `${p.topic}:${p.partition}:${p.offset}`;
    say(`${what}: accepted at ${minPosition}; reading it back…`);
    return { answer, minPosition, readBack: await reloadMoney(minPosition) };
  }

  // ---- balance entries -----------------------------------------------------------------

  function appendEntries(data) {
    const sign = (text) => (text.startsWith('-') ? text : `+${text}`);
    for (const e of data.entries) {
      const detail = [];
      if (e.code) detail.push(`code ${e.code}`);
      if (e.grant) detail.push(`grant ${shortId(e.grant)}`);
      $('entries').append(el('li', { 'data-testid': 'entry', 'data-seq': e.seq, 'data-kind': e.kind },
        el('span', { class: 'seq', text: `#${e.seq}` }),
        el('span', { class: `badge ${e.kind}`, text: e.kind.replace(/_/g, ' ') }),
        el('span', { class: 'num', 'data-testid': 'entry-amount', text: `${sign(e.amount)} ${e.currency}` }),
        el('span', { class: 'help', text: `balance ${e.balance_before} → ${e.balance_after}` }),
        el('span', { class: 'help' }, 'cause ', el('code', { title: e.cause, text: shortId(e.cause) })),
        detail.length ? el('span', { class: 'help', text: detail.join(', ') }) : null));
    }
    if (!$('entries').children.length) $('entries').append(el('li', { text: 'No balance entries.' }));
    view.entriesAfter = data.next_after;
    $('entries-more').hidden = data.next_after === null || data.next_after === undefined;
  }

  async function moreEntries() {
    const answer = await read(customerPath(view.customer, `/balance-entries${query([['limit', 100], ['after', view.entriesAfter], ['min_position', view.entriesAt]])}`));
    if (answer.ok) appendEntries(answer.data);
    else alarm(`Entries could not be read (${errorText(answer)}).`);
  }

  // ---- line items ----------------------------------------------------------------------

  function renderItems() {
    const items = view.items;
    if (!items.length) {
      // A page looks at a bounded number of items: an empty one with a cursor is not the end.
      const more = Boolean(view.itemsCursor);
      const text = more ? 'No line items among those read so far: load more.' : 'No line items in this period.';
      $('items').replaceChildren(el('p', { 'data-testid': 'items-none', text }));
      $('items-more').hidden = !more;
      return;
    }
    const replacedBy = new Map();
    for (const item of items) if (item.supersedes) replacedBy.set(item.supersedes, item.id);
    const rows = items.map((item) => {
      const links = el('td', {});
      if (item.supersedes) {
        links.append(el('button', { type: 'button', class: 'link', 'data-testid': 'supersedes-link', onclick: () => focusItem(item.supersedes) },
          `supersedes ${shortId(item.supersedes)}`));
      }
      if (replacedBy.has(item.id)) {
        links.append(el('button', { type: 'button', class: 'link', onclick: () => focusItem(replacedBy.get(item.id)) },
          `superseded by ${shortId(replacedBy.get(item.id))}`));
      } else if (item.superseded) {
        links.append(el('span', { class: 'help', text: 'superseded' }));
      }
      return el('tr', { id: `item-${item.id}`, tabindex: '-1', 'data-testid': 'item-row', 'data-item-id': item.id, class: item.superseded ? 'superseded' : '' },
        el('th', { scope: 'row' }, el('code', { title: item.id, text: shortId(item.id) })),
        el('td', { title: `${item.window_start} – ${item.window_end}`, text: windowText(item) }),
        el('td', { text: item.meter }),
        el('td', { text: groupText(item.group) }),
        el('td', {}, el('span', { class: `badge ${item.kind}`, text: item.kind }), item.revision > 1 ? ` r${item.revision}` : ''),
        num(item.window_quantity, 'item-window-quantity'),
        num(item.period_quantity, 'item-period-quantity'),
        num(`${item.amount} ${item.currency}`, 'item-amount', { 'data-value': item.amount }),
        num(`${item.period_amount} ${item.currency}`, 'item-period-amount'),
        links,
        el('td', {}, el('button', { type: 'button', 'data-testid': 'explain-button', 'aria-label': `Explain charge ${item.id}`, onclick: () => explain(item) }, 'Explain')));
    });
    $('items').replaceChildren(table(`Line items of ${view.period}`,
      ['Item', 'Window', 'Meter', 'Group', 'Kind', 'Window qty', 'Period qty', 'Amount', 'Period amount', 'Adjusts', ''], rows, { class: 'items' }));
    $('items-more').hidden = !view.itemsCursor;
  }

  async function moreItems() {
    const answer = await read(customerPath(view.customer, `/line-items${query([['period', view.period], ['limit', MAX_PAGE], ['cursor', view.itemsCursor], ['min_position', view.itemsAt]])}`));
    if (!answer.ok) {
      alarm(`Line items could not be read (${errorText(answer)}).`);
      return;
    }
    view.items = view.items.concat(answer.data.items);
    view.itemsCursor = answer.data.next_cursor;
    renderItems();
  }

  function focusItem(id) {
    const row = document.getElementById(`item-${id}`);
    if (!row) {
      say(`Item ${id} is not on this page (another period, or a later page).`);
      return;
    }
    for (const r of document.querySelectorAll('tr.highlight')) r.classList.remove('highlight');
    row.classList.add('highlight');
    // Vertically only: a wide table's own horizontal scroll stays where the reader left it.
    row.focus({ preventScroll: true });
    window.scrollTo({ top: row.getBoundingClientRect().top + window.scrollY - window.innerHeight / 2 });
  }

  // ---- explain this charge -------------------------------------------------------------

  /** What opened the explanation, to give the focus back to when it closes. */
  let explainedFrom = null;

  function closeExplanation() {
    $('explanation').hidden = true;
    if (explainedFrom && document.body.contains(explainedFrom)) explainedFrom.focus();
    explainedFrom = null;
  }

  async function explain(item) {
    explainedFrom = document.activeElement;
    say(`Explaining ${item.id}…`);
    const answer = await read(customerPath(view.customer, `/line-items/${enc(item.id)}/explanation${query([['period', view.period]])}`));
    const box = $('explanation-body');
    if (!answer.ok) {
      alarm(`The explanation could not be read (${errorText(answer)}).`);
      return;
    }
    const x = answer.data;
    const cur = x.plan.currency;
    const lineRow = (line) => {
      switch (line.kind) {
        case 'tier':
          return [`Tier ${line.tier}`, `(${line.above}, ${line.up_to === null ? '∞)' : `${line.up_to}]`}`, line.units, line.unit_price, line.flat_fee, line.subtotal];
        case 'units':
          return ['Units', '', line.units, line.unit_price, '0', line.subtotal];
        case 'packages':
          return [`${line.packages} package(s) of ${line.size}`, '', line.units, line.price, '0', line.subtotal];
        case 'flat':
          return ['Flat fee per period', '', '', '', line.fee, line.fee];
        case 'negative_total':
          return [`Negative period total ${line.quantity}: priced as zero`, '', '', '', '', '0'];
        default:
          return [line.kind, '', '', '', '', ''];
      }
    };
    const rows = x.price.lines.map((line) => {
      const cells = lineRow(line);
      return el('tr', { 'data-testid': 'explanation-line', 'data-kind': line.kind },
        el('th', { scope: 'row', text: cells[0] }),
        el('td', { text: cells[1] }),
        num(cells[2], 'explanation-units'),
        num(cells[3], 'explanation-unit-price'),
        num(cells[4], 'explanation-flat-fee'),
        num(cells[5], 'explanation-subtotal'));
    });
    const fact = (label, value, testid) => el('div', {}, el('dt', { text: label }), el('dd', { 'data-testid': testid, text: value }));
    const parts = [
      el('p', {}, 'Line item ', el('code', { 'data-testid': 'explanation-item', text: x.item.id }),
        ` (${x.item.meter}, ${groupText(x.item.group)}, window ${x.item.window_start} – ${x.item.window_end})`),
      el('p', {}, 'Plan ', el('strong', { 'data-testid': 'explanation-plan', text: `${x.plan.id} v${x.plan.version}` }),
        ` (${cur}), in force from ${x.plan.effective_from}; the period's quantity to date, this item included, priced step by step:`),
      el('dl', { class: 'totals' },
        fact('Period quantity', x.price.quantity, 'explanation-quantity'),
        fact('Included units', x.price.included_units, 'explanation-included'),
        fact('Billable', x.price.billable, 'explanation-billable')),
      table('How the period total is priced', ['Step', 'Range', 'Units', 'Unit price', 'Flat fee', 'Subtotal'], rows),
      el('dl', { class: 'totals' },
        fact('Model amount', x.price.model_amount, 'explanation-model-amount'),
        x.price.minimum_applied !== null ? fact('Minimum applied', x.price.minimum_applied, 'explanation-minimum') : null,
        x.price.maximum_applied !== null ? fact('Maximum applied', x.price.maximum_applied, 'explanation-maximum') : null,
        fact(`Period total, rounded half-up to ${x.price.precision} decimals`, `${x.price.amount} ${cur}`, 'explanation-amount'),
        fact('Charged before this item', `${x.previously_charged} ${cur}`, 'explanation-previously'),
        fact('This item', `${x.item.amount} ${cur}`, 'explanation-item-amount')),
      x.matches_ledger ? null : el('p', { class: 'alert-inline', 'data-testid': 'explanation-mismatch', text: 'The catalog now prices this quantity differently from the ledger: the plan changed since.' }),
      el('details', {}, el('summary', { text: 'As neruba price prints it' }), el('pre', { 'data-testid': 'explanation-text', text: x.text })),
    ];
    box.replaceChildren(...parts.filter(Boolean));
    $('explanation').hidden = false;
    $('explanation').focus();
    say(`Explanation of ${x.item.id}: ${x.price.lines.length} step(s).`);
  }

  // ---- wiring --------------------------------------------------------------------------

  async function start() {
    $('sign-in-form').addEventListener('submit', signIn);
    $('sign-out').addEventListener('click', signOut);
    $('customer-query').addEventListener('input', renderCustomers);
    $('customer-search').addEventListener('submit', (event) => {
      event.preventDefault();
      const id = $('customer-query').value.trim();
      if (id) location.hash = `#/customers/${enc(id)}`;
    });
    $('customer-more').addEventListener('click', () => loadCustomers(false));
    $('period-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const period = $('period').value;
      if (/^\d{4}-\d{2}$/.test(period)) location.hash = `#/customers/${enc(view.customer)}?period=${period}`;
    });
    $('refresh').addEventListener('click', () => loadCustomer());
    $('grant-form').addEventListener('submit', submitGrant);
    $('entries-more').addEventListener('click', moreEntries);
    $('items-more').addEventListener('click', moreItems);
    $('explanation-close').addEventListener('click', closeExplanation);
    $('explanation').addEventListener('keydown', (event) => {
      if (event.key === 'Escape') closeExplanation();
    });
    window.addEventListener('hashchange', route);
    await restore();
    route();
    document.body.setAttribute('data-ready', 'true');
  }

  start();
})();
