package gpudispatch.nacos;

import com.alibaba.nacos.auth.AuthManager;
import com.alibaba.nacos.auth.model.Permission;
import com.alibaba.nacos.auth.model.User;
import com.alibaba.nacos.core.code.ControllerMethodsCache;
import javax.annotation.PostConstruct;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.actuate.autoconfigure.security.servlet.ManagementWebSecurityAutoConfiguration;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.security.servlet.SecurityAutoConfiguration;
import org.springframework.boot.autoconfigure.security.servlet.UserDetailsServiceAutoConfiguration;
import org.springframework.boot.web.servlet.ServletComponentScan;
import org.springframework.context.annotation.Bean;
import org.springframework.scheduling.annotation.EnableScheduling;

/**
 * Main class of the Nacos 2.0.4 server in standalone mode, in place of the console module's
 * {@code com.alibaba.nacos.Nacos}, which is not republished on Maven Central. It does what that
 * module does at start-up, minus the web console and its user database:
 * <ul>
 *   <li>boots Spring over every Nacos server package (core, naming, config), with Spring Security's
 *       auto-configuration off, as the console does;</li>
 *   <li>fills the controller-method cache that Nacos's request filters look up (the console's own
 *       configuration does this; without it the naming HTTP API answers 501);</li>
 *   <li>provides the {@link AuthManager} bean the auth filters need; the real one lives in the
 *       console module, so this one lets everything through (auth is off, see application.properties);</li>
 *   <li>serves the console's health endpoints ({@link ConsoleHealthController}).</li>
 * </ul>
 */
@SpringBootApplication(scanBasePackages = {"com.alibaba.nacos", "gpudispatch.nacos"},
        exclude = {SecurityAutoConfiguration.class, UserDetailsServiceAutoConfiguration.class,
                ManagementWebSecurityAutoConfiguration.class})
@ServletComponentScan(basePackages = "com.alibaba.nacos")
@EnableScheduling
public class NacosMain {

    @Autowired
    private ControllerMethodsCache methodsCache;

    public static void main(String[] args) {
        System.setProperty("nacos.standalone", "true");
        try {
            SpringApplication.run(NacosMain.class, args);
        } catch (Throwable failure) {
            // Spring has logged why; without this, JRaft's and gRPC's threads keep a failed server's
            // JVM alive (the console's main class has the same flaw).
            System.exit(1);
        }
    }

    @PostConstruct
    public void initControllerMethods() {
        methodsCache.initClassMethod("com.alibaba.nacos.core.controller");
        methodsCache.initClassMethod("com.alibaba.nacos.naming.controllers");
        methodsCache.initClassMethod("com.alibaba.nacos.config.server.controller");
        methodsCache.initClassMethod("gpudispatch.nacos");
    }

    /** Auth is disabled locally; Nacos still wants an AuthManager bean. */
    @Bean
    public AuthManager noopAuthManager() {
        return new AuthManager() {
            @Override
            public User login(Object request) {
                User user = new User();
                user.setUserName("nacos");
                return user;
            }

            @Override
            public User loginRemote(Object request) {
                return login(request);
            }

            @Override
            public void auth(Permission permission, User user) {
            }
        };
    }
}
