// Drives orderflow's live page (GET /) in the system's headless Chromium
// through Playwright: `node live.mjs order|burst|replay`, with ORDERFLOW_URL
// (order-api) and ORDERFLOW_ADMIN_KEY set. Exits non-zero, saying what was
// not seen, when the page does not show what the scenario expects;
// ORDERFLOW_SCREENSHOT names a PNG to write of the page under the burst.
import { chromium } from "playwright-core";

const [scenario] = process.argv.slice(2);
const base = process.env.ORDERFLOW_URL;
const key = process.env.ORDERFLOW_ADMIN_KEY;
if (!base || !key || !["order", "burst", "replay"].includes(scenario)) {
  console.error("usage: ORDERFLOW_URL=… ORDERFLOW_ADMIN_KEY=… node live.mjs order|burst|replay");
  process.exit(2);
}
// Generous: the page is driven on two busy cores.
const WAIT = 120_000;

async function step(what, run) {
  try {
    const result = await run();
    console.log(`  seen: ${what}`);
    return result;
  } catch (error) {
    throw new Error(`not seen: ${what} (${error.message.split("\n")[0]})`);
  }
}

function number(page, selector) {
  return page.$eval(selector, (node) => Number(node.textContent));
}

const scenarios = {
  // An order placed with the button reaches notified and audited, taken by
  // one of the processors; the same request twice is one order.
  async order(page) {
    await page.click("#place");
    const row = await step("the order appears on the page", () => page.waitForSelector("#orders tr[data-order]", { timeout: WAIT }));
    const id = await row.getAttribute("data-order");
    await step(`order ${id} reaches notified and audited`, () =>
      page.waitForSelector(`#orders tr[data-order="${id}"][data-stage="notified"]`, { timeout: WAIT }));
    const journey = await page.$eval(`#orders tr[data-order="${id}"] .journey`, (node) => node.textContent);
    for (const expected of ["accepted", "taken by processor-", "processed", "notified", "audited"]) {
      if (!journey.includes(expected)) throw new Error(`the journey of ${id} lacks "${expected}": ${journey}`);
    }
    await step("a processor's count is shown", () => page.waitForSelector("#processors tr[data-processor] .count", { timeout: WAIT }));
    await page.click("#twice");
    await step("the same request twice is one order, replayed", () =>
      page.waitForSelector('#demo-output li[data-idempotent="true"]', { timeout: WAIT }));
    await page.click("#flaky");
    await step("a flaky order retries, then is processed", () =>
      page.waitForSelector('#orders tr[data-retried="true"][data-stage="notified"]', { timeout: WAIT }));
  },

  // A burst makes the depth chart rise, then drain back to zero.
  async burst(page) {
    await page.click("#burst");
    await step("the queue depth rises", () =>
      page.waitForFunction(() => Number(document.querySelector("#depth-peak").textContent) >= 50, null, { timeout: WAIT }));
    const shot = process.env.ORDERFLOW_SCREENSHOT;
    if (shot) {
      // Once it has drained a little: the chart shows the rise and the fall.
      await page.waitForFunction(() => {
        const now = Number(document.querySelector("#depth-total").textContent);
        const peak = Number(document.querySelector("#depth-peak").textContent);
        return now <= peak * 0.6;
      }, null, { timeout: WAIT * 2 });
      await page.screenshot({ path: shot, fullPage: true });
      console.log(`  screenshot written to ${shot}`);
    }
    await step("every queue drains back to zero", () =>
      page.waitForFunction(() => document.querySelector("#depth-total").textContent === "0", null, { timeout: WAIT * 3 }));
    const peak = await number(page, "#depth-peak");
    console.log(`  the depth peaked at ${peak} ready messages`);
    const decided = await page.$$eval("#processors tr[data-processor]", (rows) => rows.length);
    if (decided < 2) throw new Error(`only ${decided} processor(s) shown sharing the burst`);
    console.log(`  ${decided} processors shared the burst`);
  },

  // A doomed order is dead-lettered, shown with its reason, and replayed
  // from the page back onto its queue.
  async replay(page) {
    await page.click("#doomed");
    const row = await step("the doomed order appears", () => page.waitForSelector("#orders tr[data-order]", { timeout: WAIT }));
    const id = await row.getAttribute("data-order");
    await step("it is retried", () => page.waitForSelector(`#orders tr[data-order="${id}"][data-retried="true"]`, { timeout: WAIT }));
    await step("it is dead-lettered on its row", () =>
      page.waitForSelector(`#orders tr[data-order="${id}"][data-stage="dead_lettered"]`, { timeout: WAIT }));
    const letter = await step("it is listed with its reason among the dead letters", () =>
      page.waitForSelector(`#dead-letters tr[data-order="${id}"]`, { timeout: WAIT }));
    const messageId = await letter.getAttribute("data-message-id");
    const reason = await letter.$eval("td:nth-child(2)", (node) => node.textContent);
    if (!reason.includes("payment")) throw new Error(`the dead letter's reason says nothing of the payment: ${reason}`);
    const retriesBefore = await page.$$eval(`#orders tr[data-order="${id}"] .step.retry`, (steps) => steps.length);
    await letter.$eval("button.replay", (button) => button.click());
    await step("the page says it was replayed", () =>
      page.waitForFunction(() => [...document.querySelectorAll("#demo-output li")].some((li) => li.textContent.includes("replayed onto")), null, { timeout: WAIT }));
    await step("it has left the dead letters", () =>
      page.waitForFunction((m) => !document.querySelector(`#dead-letters tr[data-message-id="${m}"]`), messageId, { timeout: WAIT }));
    await step("the replayed order is worked on again (a new retry on its row)", () =>
      page.waitForFunction(([order, before]) =>
        document.querySelectorAll(`#orders tr[data-order="${order}"] .step.retry`).length > before + 1, [id, retriesBefore], { timeout: WAIT }));
  },
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The machine's network is closed: no background fetches, no QUIC.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1200 } });
  page.on("pageerror", (error) => problems.push(`script error on the page: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console error on the page: ${message.text()}`);
  });
  await page.goto(`${base}/`);
  await page.fill("#key", key);
  await page.click("#connect button");
  await step("the page connects to both streams", () => page.waitForSelector('#connection[data-state="live"]', { timeout: WAIT }));
  await step("queue depths arrive", () => page.waitForSelector("#queues tr[data-queue]", { timeout: WAIT }));
  await scenarios[scenario](page);
  if (problems.length) throw new Error(problems.join("\n"));
  console.log(`live page, ${scenario}: ok`);
} catch (error) {
  console.error(`live page, ${scenario}: FAILED: ${error.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
