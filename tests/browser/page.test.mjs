// The live web page in a real browser (Debian's chromium, driven by
// playwright-core): a real `bizsignal serve`, the real `bizsignal demo`
// sending OTLP, and assertions on what a person would see. Screenshots go
// to target/screenshots/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const ROOT = resolve(import.meta.dirname, "../..");
const BIN = process.env.BIZSIGNAL_BIN || join(ROOT, "target/debug/bizsignal");
const SHOTS = join(ROOT, "target/screenshots");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
let server, browser, grpc, http, dataDir;

function startServer() {
  const dir = (dataDir = mkdtempSync(join(tmpdir(), "bizsignal-page-")));
  const child = spawn(BIN, ["serve", "--otlp-grpc", "127.0.0.1:0", "--otlp-http", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir", dir], {
    env: { ...process.env, RUST_LOG: "info" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error("serve did not start")), 20000);
    createInterface({ input: child.stderr }).on("line", line => {
      if (line.includes("bizsignal started")) {
        clearTimeout(timer);
        const field = k => line.split(` ${k}=`)[1].split(/\s/)[0];
        ok({ child, grpc: field("otlp_grpc"), http: field("http") });
      }
    });
    child.on("exit", code => fail(new Error(`serve exited with ${code}`)));
  });
}

function demo(pace, suffix) {
  const child = spawn(BIN, ["demo", "--endpoint", `http://${grpc}`, "--pace", pace, "--run-suffix", suffix], { stdio: "ignore" });
  return new Promise(ok => child.on("exit", code => ok(code)));
}

const badge = (page, name, word) => page.locator(`article[data-process="${name}"] .badge`, { hasText: new RegExp(`^${word}$`) });
const cardText = (page, name) => page.locator(`article[data-process="${name}"]`).innerText();

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  ({ child: server, grpc, http } = await startServer());
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  if (server && server.exitCode === null) {
    const exited = new Promise(ok => server.once("exit", ok));
    server.kill("SIGTERM");
    await exited;
  }
  // The server's data dir (each run left one in the temp dir before).
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

test("board shows the demo's processes and a status change arrives without reload", async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.goto(`http://${http}/`);
  await page.getByText("No business process has reported yet").waitFor();
  // The import paces its progress slowly, so the page sees it running first.
  const sender = demo("1500ms", "ui");
  const imp = page.locator('article[data-process="product-import"]');
  await badge(page, "product-import", "Running").waitFor({ timeout: 15000 });
  await badge(page, "invoice-reconciliation", "Failed").waitFor({ timeout: 15000 });
  await badge(page, "nightly-report", "Succeeded").waitFor({ timeout: 15000 });
  const recon = await cardText(page, "invoice-reconciliation");
  assert.match(recon, /reconciled: 1,795/);
  assert.match(recon, /unmatched: 45/);
  assert.match(recon, /ledger unavailable/);
  assert.match(await cardText(page, "nightly-report"), /processed: 5,200/);
  await imp.getByText(/of 12,000 done/).waitFor({ timeout: 15000 });
  await page.screenshot({ path: join(SHOTS, "board.png") });
  // Same page, no reload: the import finishes and the card says so.
  const reloads = [];
  page.on("framenavigated", f => { if (f === page.mainFrame()) reloads.push(f.url()); });
  await badge(page, "product-import", "Succeeded").waitFor({ timeout: 30000 });
  const done = await cardText(page, "product-import");
  assert.match(done, /skipped: 12/);
  assert.match(done, /imported: 11,994/);
  assert.match(done, /12,000 of 12,000 done \(100%\)/);
  assert.deepEqual(reloads, [], "the page was not reloaded");
  assert.equal(await sender, 0, "bizsignal demo succeeded");
  await page.screenshot({ path: join(SHOTS, "board-done.png") });

  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await phone.goto(`http://${http}/`);
  await badge(phone, "product-import", "Succeeded").waitFor();
  const width = await phone.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 390, `no horizontal scrolling on a phone (${width}px)`);
  await phone.screenshot({ path: join(SHOTS, "board-phone.png"), fullPage: true });
});

test("run page shows timeline, counts, payloads, error and violations in plain words", async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.goto(`http://${http}/`);
  await page.locator('article[data-process="invoice-reconciliation"] a', { hasText: "recon-ui" }).click();
  await page.getByText("Reached milestone").first().waitFor();
  const text = await page.locator("main").innerText();
  assert.match(text, /Reached milestone statements-fetched/);
  assert.match(text, /Reached milestone invoices-matched/);
  assert.match(text, /Run failed: ledger unavailable/);
  assert.match(text, /Error: ledger unavailable/);
  assert.match(text, /45 invoices left unmatched/);
  assert.match(text, /reconciled\s+1,795/);
  assert.match(page.url(), /#\/run\/invoice-reconciliation\/recon-ui$/);
  await page.screenshot({ path: join(SHOTS, "run-failed.png"), fullPage: true });

  await page.goto(`http://${http}/#/run/product-import/import-ui`);
  await page.getByRole("heading", { name: "Attached data" }).waitFor();
  const imp = await page.locator("main").innerText();
  assert.match(imp, /"price_changes": 214/, "payload pretty-printed");
  assert.match(imp, /Reached milestone prices-validated/);
  assert.match(imp, /Run succeeded/);
  await page.screenshot({ path: join(SHOTS, "run-succeeded.png"), fullPage: true });
});
